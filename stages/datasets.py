"""The datasets the pipeline knows: one table, read by params validation, download, preprocess."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class DatasetSpec:
    name: str
    image_size: int  # side of the square uint8 images preprocess writes
    embedded: bool  # True: generated or shipped locally, never touches the network
    description: str


DATASETS: dict[str, DatasetSpec] = {
    spec.name: spec
    for spec in [
        DatasetSpec(
            "digits",
            image_size=32,
            embedded=True,
            description="scikit-learn's 1,797 handwritten 8x8 digits, MNIST-style 32x32x3",
        ),
    ]
}
