"""The patch index: every latent patch of a member's push (training) and test splits, searchable with FAISS.

A *patch* is one (D,) float32 column z[:, h, w] of the latent map z = f(x) (N, D, H, W) that prototypes are
compared with (paper §2.1). Per member and split the index is two files::

    members/<m>/patches.faiss       + patches.parquet        the push (training) split
    members/<m>/patches_test.faiss  + patches_test.parquet   the test split

Row r of the FAISS index is row r of the parquet table: ``image_index`` (into the split), ``image_id``,
``image_path`` ("" for images held in memory), ``label``, ``h``, ``w`` and ``part`` (the ground-truth part at the
patch, see :func:`patch_part`; -1 when the dataset has no part annotation). Rows are ordered image by image,
then h, then w. Distances are squared L2, the distance prototypes use.

The parquet schema metadata records the checkpoint the index was built from (sha256 of the member's
``model.safetensors``); :func:`load_index` refuses a stale index with :class:`StaleIndexError`.

The index is built at the end of training from the latents the push pass already computed (the selected
epoch's push pass: the last-layer stage does not change them) and the latents of the pass that evaluates the
member on the test split, so building it costs no extra forward pass. ``protoaudit index RUN`` rebuilds it
with one forward pass per split.

Search backends (identical results for the exact ``flat`` index):

* ``faiss``: faiss on the CPU (the default without CUDA);
* ``faiss-gpu``: a GPU-enabled faiss when CUDA exists and faiss was built with GPU support;
* ``torch``: exact k-NN in torch (on the GPU when CUDA exists, else the CPU), ties broken by the lower row.
"""
