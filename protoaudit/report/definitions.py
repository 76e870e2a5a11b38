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

NAUTA_2023 = (
    "Nauta, Schlötterer, van Keulen, Seifert. PIP-Net: Patch-Based Intuitive Prototypes for Interpretable "
    "Image Classification. CVPR 2023"
)
GUO_2017 = "Guo, Pleiss, Sun, Weinberger. On Calibration of Modern Neural Networks. ICML 2017"
EFRON_1993 = "Efron, Tibshirani. An Introduction to the Bootstrap. Chapman & Hall 1993"
MCNEMAR_1947 = (
    "McNemar. Note on the sampling error of the difference between correlated proportions or percentages. "
    "Psychometrika 1947"
)
BECK_2009 = (
    "Beck, Teboulle. A Fast Iterative Shrinkage-Thresholding Algorithm for Linear Inverse Problems. "
    "SIAM J. Imaging Sciences 2009"
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
        "(each image contributes only its closest patch, over all classes), the number that belong to c, "
        "shown as “n of k” (purity.csv stores n; divide by k for a fraction). A prototype is pruned when fewer "
        "than τ of the k are of class c (k = 6, τ = 3 by default), then the last layer is retrained.",
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
        "name": "last-layer solver",
        "definition": "schedule.last_layer_solver = fista (the default): after each push the last-layer stage "
        "runs the original code's Adam schedule (last_layer_epochs Adam epochs at lr.last_layer), and once the "
        "cycles are over the selected push's layer is replaced by the solution of the paper's convex problem: "
        "mean cross-entropy + λ·Σ|off-class weights| (λ = loss.l1) on the similarities of the whole push split, "
        "solved from the Adam layer by accelerated proximal gradient with soft-thresholding of the off-class "
        "weights only (which makes them exactly 0), a backtracking step and momentum restarts, until every "
        "entry of the smallest subgradient of the objective (the L1 optimality residual) is at most "
        "schedule.last_layer_tol, or schedule.last_layer_max_iter iterations (then 'reached tolerance' is no). "
        "fista_each_push solves the convex problem after every push instead; the joint epochs that follow then "
        "train under it. When the push split is separable by the own-class prototypes alone, the cross-entropy "
        "has no minimiser (the own-class weights can grow without end) and the answer depends on the tolerance. "
        "adam: the original code's schedule after every push and nothing more, which does not reach zeros. "
        "'Dense against solved' compares, on the test split, the Adam layer with the solved one that replaced it.",
        "source": f"{CHEN_2019}, §2.2 (stage 3, convex optimisation of the last layer); {BECK_2009}",
    },
    {
        "name": "compactness: sparsity, global size, local size",
        "definition": "A weight counts as zero when |w| ≤ 1e-3. Sparsity: share of all last-layer weights "
        "that are zero; off-class sparsity: the same over off-class weights. Global size: prototypes with at "
        "least one non-zero weight. Local size: per test image, the prototypes whose contribution "
        "similarity × weight to the predicted class has a non-zero weight and an absolute value above 1e-3, "
        "averaged over the test images (any class: a contribution to any class counts). For an ensemble the "
        "members' last layers stand side by side: global sizes add, and local size counts every member's "
        "contributions to the ensemble's predicted class.",
        "source": f"{NAUTA_2023}, §4 (sparsity ratio, global and local explanation size)",
    },
    {
        "name": "bootstrap interval of top-1",
        "definition": "The test images are resampled with replacement 2000 times (seed 0); the interval runs "
        "from the 2.5th to the 97.5th percentile of the resampled top-1 (percentile interval). The same "
        "resamples serve every model, so two models' intervals and their difference are paired. accuracy.csv "
        "columns top1_low and top1_high.",
        "source": f"{EFRON_1993}, §13.3",
    },
    {
        "name": "exact McNemar test",
        "definition": "Two models on the same test images: b images only model a gets right, c only model b. "
        "Under the hypothesis that both are equally accurate each of the b + c discordant images is a fair "
        "coin, so the two-sided p = min(1, 2·P[Binomial(b + c, 1/2) ≤ min(b, c)]). Shown for the ensemble "
        "against its member with the best validation top-1 and for each pruned model against its unpruned "
        "one, beside the paired bootstrap interval of the difference in top-1.",
        "source": MCNEMAR_1947,
    },
    {
        "name": "expected calibration error (ECE) and reliability diagram",
        "definition": "Confidence = the largest softmax probability (for an ensemble, of the summed logits). "
        "Test images fall into 15 equal-width confidence bins; ECE = Σ over bins of (images in the bin / all "
        "images) × |accuracy in the bin − mean confidence in the bin|. The reliability diagram shows each "
        "bin's accuracy against the diagonal of a perfectly calibrated model (scikit-learn's "
        "calibration_curve bins the same way).",
        "source": GUO_2017,
    },
    {
        "name": "per-class precision, recall, F1",
        "definition": "Per class k: precision = right predictions of k / predictions of k; recall = right "
        "predictions of k / test images of k; F1 their harmonic mean (0 where undefined); macro: the mean "
        "over classes. With two classes also sensitivity (recall of class 1) and specificity (recall of class "
        "0). Computed with scikit-learn (precision_recall_fscore_support).",
        "source": "Sokolova, Lapalme. A systematic analysis of performance measures for classification "
        "tasks. Information Processing & Management 2009",
    },
    {
        "name": "push's effect on predictions",
        "definition": "At every push, the val and test images (and the push split's own images) are predicted "
        "before push, right after push with the last layer unchanged, and after the last-layer stage that "
        "follows; changed = share of images whose predicted class differs from before push; right → wrong = "
        "share of images right before push that are wrong after. Test predictions are only reported here, "
        "never used for model selection.",
        "source": f"{CHEN_2019}, §2.2, Theorem 2.1",
    },
    {
        "name": "confusion matrix",
        "definition": "Counts of test images by true class (rows) and predicted class (columns), for the "
        "ensemble, from the members' saved test logits (summed; scikit-learn's confusion_matrix).",
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
        "definition": "Share of a prototype's 10 nearest training patches (one per image) that carry the "
        "part most frequent among them — which need not be the part under its own source patch; background "
        "never counts as that part.",
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
        "largest drop; causal_drops lists every element's. causal_drop_all is the drop when every element is "
        "removed at once (the image's background alone): it checks the label background, since a prototype "
        "that two elements carry together loses less than half to either removal yet is silenced by both "
        "(audit.json counts such prototypes as background_carried_by_elements; the label is not changed).",
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


# audit.json keys → (label shown, how the value reads: "count", "fraction" or "number", definition name)
AUDIT_LABELS: dict[str, tuple[str, str, str | None]] = {
    "n_prototypes": ("prototypes", "count", None),
    "n_pruned": ("pruned", "count", "k-NN class purity"),
    "mean_purity": ("mean k-NN purity (n of k)", "number", "k-NN class purity"),
    "top1": ("top-1 before pruning", "fraction", "top-1 accuracy"),
    "top1_pruned": ("top-1 after pruning", "fraction", "top-1 accuracy"),
    "prototypes_on_background": ("prototypes on background", "count", "ground-truth part"),
    "prototypes_on_shared_parts": ("prototypes on shared parts", "count", "ground-truth part"),
    "prototypes_on_discriminative_parts": (
        "prototypes on discriminative parts",
        "count",
        "ground-truth part",
    ),
    "pruning_precision": ("pruning precision", "fraction", "pruning precision and recall"),
    "pruning_recall": ("pruning recall", "fraction", "pruning precision and recall"),
    "part_purity": ("part purity", "fraction", "part purity"),
    "part_purity_kept": ("part purity, kept prototypes", "fraction", "part purity"),
    "consistency": ("consistency", "fraction", "consistency"),
    "consistency_kept": ("consistency, kept prototypes", "fraction", "consistency"),
    "stability": ("stability", "fraction", "stability"),
    "stability_kept": ("stability, kept prototypes", "fraction", "stability"),
}


def definition_text(name: str | None) -> str | None:
    """The definition of ``name`` (a DEFINITIONS entry), for tooltips."""
    for entry in DEFINITIONS:
        if entry["name"] == name:
            return entry["definition"]
    return None
