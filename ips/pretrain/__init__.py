"""Self-supervised pretraining of the IPS encoder on patches of the stores (`ips pretrain`).

A fresh encoder gives the attention no signal to find small objects with, and the bag label alone
rarely teaches it (docs/BENCHMARKS.md, "Small objects among similar distractors"). Pretraining the encoder on the stores' own patches, without labels, gives
embeddings in which similar structures lie close: then selection can pick the object from the first
epoch of `ips train ... model.pretrained=DIR/encoder.pt`.

- `augment`: the views (H&E: HED stain jitter, greyscale, blur, crop, flips, quarter turns; grey/3D:
  intensity scale/shift/gamma, noise, small affine deformations, flips);
- `sampler`: patches drawn across all stores, read a few at a time per store (never a whole slide);
- `methods`: SimCLR (NT-Xent) and rotation prediction, 2D and 3D;
- `loop`: the resumable training loop; writes `encoder.pt` (a state_dict for `model.pretrained`),
  `encoder.json` (what it fits), `state.pt` (resume), `loss.csv`, `loss.png`.
"""

from ips.pretrain.loop import ENCODER_FILE, ENCODER_META, pretrain_encoder

__all__ = ["ENCODER_FILE", "ENCODER_META", "pretrain_encoder"]
