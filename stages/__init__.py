"""convnet-pipeline's stages: download, preprocess, train, evaluate, and their shared helpers."""
