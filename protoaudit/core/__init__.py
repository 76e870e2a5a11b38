"""Layer 1 of 3: pure tensor and array functions and the model.

Nothing here opens a file, prints, or speaks of commands: the model and its distances, losses, purity and audit
metrics, detectors of bad prototypes, geometry of boxes, cells and parts, exact k-NN, ensemble logits, top-1,
statistics. The one exception to "no files": a trunk reads the pretrained weights it is built with (a local
state-dict file or torchvision's cache), as model registries do. The engine (``protoaudit.engine``) and everything above it build on this.
"""
