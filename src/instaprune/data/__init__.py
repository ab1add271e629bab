"""Images in, tensors out: ImageFolder / CIFAR-batch loading, stratified splits and subsets, augmentation,
and the synthetic shapes dataset of the demo. Imports only ``core``.
"""


from instaprune._lazy import lazy_exports

_EXPORTS = {
    "ImageSet": "datasets",
    "CIFAR10_CLASSES": "datasets",
    "load_image_folder": "datasets",
    "load_cifar_batches": "datasets",
    "load_dataset": "datasets",
    "make_folder_loader": "datasets",
    "iterate_batches": "datasets",
    "epoch_permutation": "datasets",
    "shard_indices": "datasets",
    "AUGMENTATIONS": "augment",
    "augment_params": "augment",
    "augment_batch": "augment",
    "CLASS_NAMES": "synthetic",
    "DemoData": "synthetic",
    "DemoRecipe": "synthetic",
    "RECIPE": "synthetic",
    "make_dataset": "synthetic",
    "make_splits": "synthetic",
    "mean_std": "synthetic",
}

__all__, __getattr__ = lazy_exports(__name__, _EXPORTS)
