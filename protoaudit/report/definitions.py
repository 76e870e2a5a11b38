"""Every metric the report shows, its definition, and the paper it comes from.

The report renders these verbatim (escaped); ``report.json`` carries them too, so a program reading the numbers
also reads what they mean.
"""

from __future__ import annotations

CHEN_2019 = (
    "Chen, Li, Tao, Barnett, Su, Rudin. This Looks Like That: Deep Learning for Interpretable Image "
    "Recognition. NeurIPS 2019"
)
XU_DARME_2023 = (
    "Xu-Darme, Quénot, Chihani, Rousset. Sanity checks for patch visualisation in prototype-based image "
    "classification. CVPR Workshops (XAI4CV) 2023"
)
PETSIUK_2018 = (
    "Petsiuk, Das, Saenko. RISE: Randomized Input Sampling for Explanation of Black-box Models. BMVC 2018"
)

BOX_CAVEAT = (
    "The box drawn on a prototype's source image is the paper's visualisation: the smallest rectangle around the "
    "pixels at or above the 95th percentile of the similarity map upsampled (bicubic) from the latent grid to the "
    "image. It shows where the upsampled map is high, not which pixels caused the similarity: the upsampling "
    "assumes a spatial correspondence between latent cells and pixels that the trunk does not guarantee, and "
    "such boxes fail sanity checks (Xu-Darme et al. 2023). Read it as a pointer, not an attribution; the "
    "deletion curves beside it test, for a sample of prototypes, whether the pixels it points at matter."
)

DEFINITIONS: list[dict[str, str]] = [
    {
        "name": "top-1 accuracy",
        "definition": "Fraction of test images whose largest logit is their true class. Measured on the test "
        "split only; model selection used a validation split carved from the training images.",
        "source": f"{CHEN_2019}, §2.5 (reported top-1 on CUB-200-2011)",
    },
    {
        "name": "ensemble",
        "definition": "The members' logits are added; the ensemble predicts the class of the largest sum. The "
        "report recomputes the sum from the saved members and checks it against accuracy.csv.",
        "source": f"{CHEN_2019}, §2.5 (combining ProtoPNets with different trunks)",
    },
    {
        "name": "similarity",
        "definition": "log((d + 1) / (d + ε)) with ε = 1e-4, where d is the squared L2 distance between a "
        "prototype and a latent patch; a prototype's score on an image is its largest similarity over all "
        "patches, and the logits are the last layer applied to these scores.",
        "source": f"{CHEN_2019}, §2.1",
    },
    {
        "name": "push distance",
        "definition": "Squared L2 distance a prototype moved when it was projected onto its nearest latent "
        "patch among training images of its own class (the push stage).",
        "source": f"{CHEN_2019}, §2.2",
    },
    {
        "name": "k-NN class purity",
        "definition": "For a prototype of class c: among the k training images nearest to it in latent space "
        "(each image contributes only its closest patch, over all classes), the fraction that belong to c. "
        "A prototype is pruned when fewer than τ of the k are of class c (k = 6, τ = 3 by default), then the "
        "last layer is retrained.",
        "source": f"{CHEN_2019}, §2.6 and supplement S8 (prototype pruning)",
    },
    {
        "name": "95th-percentile box",
        "definition": BOX_CAVEAT,
        "source": f"{CHEN_2019}, §2.3; caveat: {XU_DARME_2023}",
    },
    {
        "name": "deletion curve",
        "definition": "Pixels of the prototype's source image are occluded (set to the image's per-channel "
        "mean) in order of the upsampled similarity map, most activated first, and the prototype's score "
        "(its largest similarity over the occluded image) is recorded after each step, divided by the score "
        "on the intact image. The same is done in random pixel orders (their mean is shown). AUC is the "
        "area under the normalised curve over the deleted fraction 0…1 (trapezoid rule). A map that points "
        "at the pixels that cause the similarity gives a lower AUC than random order.",
        "source": f"{PETSIUK_2018} (deletion metric), applied to a prototype's similarity as suggested by "
        f"{XU_DARME_2023}",
    },
    {
        "name": "last-layer sparsity",
        "definition": "Fraction of off-class last-layer weights w(k, j) (prototype j not of class k) whose "
        "magnitude is below the threshold shown. The last-layer stage minimises cross-entropy plus "
        "λ·Σ|off-class weights|, driving these towards zero so that each class is decided by its own "
        "prototypes.",
        "source": f"{CHEN_2019}, §2.2 (convex optimisation of the last layer)",
    },
    {
        "name": "confusion matrix",
        "definition": "Counts of test images by true class (rows) and predicted class (columns), for the "
        "ensemble, from the members' saved test logits (summed).",
        "source": "standard",
    },
    {
        "name": "ground-truth part",
        "definition": "On datasets with per-pixel part masks (the embedded dataset), the part that covers the "
        "prototype's source patch (background, a discriminative part of some class, or a part shared by "
        "every class), as recorded in purity.csv.",
        "source": "protoaudit embedded dataset with known parts (protoaudit.data.parts)",
    },
    {
        "name": "pruning precision and recall",
        "definition": "Where parts are known, a prototype whose source patch lies on background or on a part "
        "shared by every class should be pruned. Precision: share of pruned prototypes that lie on such "
        "patches; recall: share of such prototypes that were pruned (empty when undefined, 0/0).",
        "source": f"this project's ground-truth audit of the pruning of {CHEN_2019}, §2.6",
    },
    {
        "name": "part purity",
        "definition": "Share of a prototype's 10 nearest training patches (one per image) that carry its most "
        "frequent ground-truth part; background never counts as that part.",
        "source": "Nauta et al. PIP-Net: Patch-Based Intuitive Prototypes for Interpretable Image "
        "Classification. CVPR 2023",
    },
    {
        "name": "consistency",
        "definition": "A prototype is consistent when one ground-truth part lies inside its activated region "
        "(a square around the maximum of the upsampled map) on at least μ = 0.8 of the test images of its "
        "class where that part is visible; the score is the share of consistent prototypes.",
        "source": "Huang et al. Evaluation and Improvement of Interpretability for Self-Explainable "
        "Part-Prototype Networks. ICCV 2023",
    },
    {
        "name": "stability",
        "definition": "Share of test images of its class on which a prototype's activated parts stay the same "
        "when small Gaussian noise is added to the input.",
        "source": "Huang et al. ICCV 2023 (as above)",
    },
    {
        "name": "duplicate prototypes",
        "definition": "Within a member: two prototypes pushed onto the same source patch, or within a small "
        "squared distance of each other. Across members (different latent spaces): the same source image "
        "with boxes that overlap (IoU at least one half).",
        "source": "this project (duplicates.csv of protoaudit prune)",
    },
    {
        "name": "concept, concept_kind (causal label)",
        "definition": "The prototype's source image is drawn again with each of its elements (object part, "
        "shared distractor, shortcut marker) removed in turn. The relative drop of the prototype's similarity "
        "(max over patches) is (base − removed) / base for each element; the concept is the element with the "
        "largest drop, and its kind the element's kind. When no removal takes away more than half of the "
        "similarity (a fraction fixed in advance: similarity × weight is the evidence a prototype adds to a "
        "logit, so the concept must carry most of it), the concept is the background. causal_drop is the "
        "largest drop; causal_drops lists every element's.",
        "source": "Hesse, Schaub-Meyer, Roth. FunnyBirds: A Synthetic Vision Dataset for a Part-Based "
        "Analysis of Explainable AI Methods. ICCV 2023 (part removal); " + CHEN_2019 + ", §2.1 (similarity)",
    },
    {
        "name": "source_part_kind (location view)",
        "definition": "A second, weaker view: the part whose pixels (or, on CUB, whose annotated location) lie "
        "at the prototype's source patch. A prototype responds to what its receptive field sees, not to the "
        "pixels of its cell, so this view can differ from the causal label. On CUB-format data a cell without "
        "a part location is 'no part annotated', which is unknown, never background; unknown prototypes are "
        "left out of precision and recall and counted.",
        "source": "this project",
    },
    {
        "name": "detector knn_purity",
        "definition": "The paper's pruning rule: flagged when fewer than τ = 3 of the k = 6 nearest training "
        "images (each through its closest patch) are of the prototype's class.",
        "source": CHEN_2019 + ", §2.6",
    },
    {
        "name": "detector class_information",
        "definition": "Flagged when the class explains less than a large effect of the ranks of the "
        "prototype's similarity over the training images: η²_H = (H − G + 1)/(n − G) < 0.14 from the "
        "Kruskal–Wallis H over the G classes. An element every class's images carry gives η² ≈ 0; a part "
        "some classes have and others lack gives a large effect, however many classes share it.",
        "source": "Kruskal, Wallis. JASA 1952; Tomczak, Tomczak. Trends in Sport Sciences 2014 (η²_H); "
        "Cohen. Statistical Power Analysis for the Behavioral Sciences, 1988 (0.14: large)",
    },
    {
        "name": "detector shift_sensitivity",
        "definition": "Flagged when the prototype's similarity on the images of its own class falls from the "
        "test split to test_shifted (where the shortcut marker leaves its class) with AUC ≥ 0.75, halfway "
        "between no effect (0.5) and complete separation (1). It looks at test and test_shifted, so its "
        "accuracies after removal there are not held out.",
        "source": "Geirhos et al. Shortcut learning in deep neural networks. Nature Machine Intelligence 2020; "
        "Mann, Whitney. Ann. Math. Statist. 1947 (AUC)",
    },
    {
        "name": "detector class_information_or_shift",
        "definition": "Flagged by class_information or by shift_sensitivity.",
        "source": "this project",
    },
    {
        "name": "detector precision, recall, F1",
        "definition": "Against the labels of kind background, shared or shortcut (the causal label where the "
        "dataset can be drawn again, else the location view): precision = flagged bad / flagged, recall = "
        "flagged bad / bad, F1 their harmonic mean, over the prototypes whose label is known.",
        "source": "van Rijsbergen. Information Retrieval, 1979 (F1)",
    },
    {
        "name": "reviewer's decisions",
        "definition": "protoaudit prune --remove MEMBER:P,... or --keep MEMBER:P,... with --reason records "
        "member, prototypes, reason, time and the sha256 of the member's weights in the run's append-only "
        "decisions.jsonl; every decision of the log is applied after the detector's flags, in order, unless it "
        "was made for other weights.",
        "source": "this project",
    },
]
