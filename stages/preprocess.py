"""Stage 2, preprocess: decode the raw files once into packed arrays nothing downstream re-decodes.

Writes to out/processed/ (as a whole, atomically):
  {train,val}_images.npy  uint8 (N, H, W, 3)      {train,val}_labels.npy  int64 (N,)
  classes.json            readable class names     mean.npy  float32 (H, W, 3), 0-255 units
  mean.png                the mean image, enlarged info.json dataset, sizes, per-channel std
  test_images.npy, test_files.json  unlabelled official test images (Tiny ImageNet only),
                          kept apart from everything with labels
  skipped.txt             files that could not be decoded (only with skip_bad_images: true)

Each source's reader (stages/data/sources/) writes its splits through the writer
(stages/data/writer.py), which puts decoded blocks straight into the .npy files: memory holds the
libraries and a few blocks, whatever the size of the dataset.
"""

from __future__ import annotations

from pathlib import Path

from stages.core import paths
from stages.core.files import atomic_dir
from stages.data.sources import SOURCES
from stages.data.writer import ProcessedWriter
from stages.params import Params


def preprocess(p: Params) -> Path:
    """Decode out/raw/ into out/processed/ and return that folder."""
    with atomic_dir(paths.PROCESSED) as folder:
        out = ProcessedWriter(folder, p.preprocess.workers, p.preprocess.skip_bad_images)
        classes = SOURCES[p.dataset].read(paths.RAW, p, out)
        info = out.finish(classes, p.dataset, p.preprocess_inputs())
    skipped = info["skipped_images"]
    print(
        f"preprocess: {p.dataset}: {info['train_count']} train + {info['val_count']} val"
        f" images of {info['image_size']}px, {len(classes)} classes"
        + (f", {skipped} undecodable files skipped" if skipped else "")
    )
    return paths.PROCESSED
