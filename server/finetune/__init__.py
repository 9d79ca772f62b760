"""Fine-tuning an image classifier on a folder of labelled images (``pixelstream finetune``).

:mod:`~server.finetune.data` reads and checks the images, :mod:`~server.finetune.model` builds,
scores and saves the network, :mod:`~server.finetune.train` runs transformers' ``Trainer``.
"""
