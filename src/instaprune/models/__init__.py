"""Model zoo: the CIFAR ResNets, VGG and demo ``tiny_resnet`` defined here; torchvision classifiers by name.

Models are always built with random weights (never downloaded); load trained weights with
:func:`instaprune.checkpoint.load_weights`. torchvision and the model modules are imported lazily, so
``import instaprune.models`` stays cheap.
"""

from __future__ import annotations

import difflib
import importlib
from collections.abc import Callable

from torch import nn

from instaprune.core.config import IMAGENET_MEAN, IMAGENET_STD, Preprocessing
from instaprune.core.errors import ConfigError, ModelError

__all__ = ["CIFAR_MODELS", "build_model", "list_models", "default_preprocessing", "is_cifar_model"]

#: CIFAR model name -> (module, builder function); all take ``num_classes`` and default to 10 classes.
_CIFAR: dict[str, tuple[str, str]] = {
    "resnet20": ("cifar_resnet", "resnet20"),
    "resnet32": ("cifar_resnet", "resnet32"),
    "resnet44": ("cifar_resnet", "resnet44"),
    "resnet56": ("cifar_resnet", "resnet56"),
    "resnet110": ("cifar_resnet", "resnet110"),
    "vgg16_bn_cifar": ("vgg", "vgg16_bn_cifar"),
    "tiny_resnet": ("tiny_resnet", "tiny_resnet"),
}
CIFAR_MODELS: tuple[str, ...] = tuple(_CIFAR)
_CIFAR_DEFAULT_CLASSES = 10


def _normalise(name: str) -> str:
    return str(name).strip().lower()


def _torchvision_names() -> list[str]:
    import torchvision.models

    # module=torchvision.models restricts to the classification models (not detection, segmentation, video...)
    return list(torchvision.models.list_models(module=torchvision.models))


def is_cifar_model(name: str) -> bool:
    """True for the 32x32 models defined in this package (``resnet20`` ... ``tiny_resnet``)."""
    return _normalise(name) in _CIFAR


def list_models() -> list[str]:
    """All buildable names: the CIFAR models first, then torchvision's classifiers (sorted)."""
    return [*CIFAR_MODELS, *sorted(set(_torchvision_names()) - set(_CIFAR))]


def _unknown(name: str) -> ModelError:
    names = list_models()
    close = difflib.get_close_matches(_normalise(name), names, n=3, cutoff=0.6)
    hint = f"; did you mean {', '.join(close)}?" if close else ""
    return ModelError(f"unknown model {name!r} (CIFAR: {', '.join(CIFAR_MODELS)}; or any torchvision "
                      f"classifier){hint}")


def build_model(name: str, num_classes: int | None = None) -> nn.Module:
    """Build ``name`` with random weights and ``num_classes`` outputs.

    ``num_classes=None`` means the model's usual head: 10 for the CIFAR models, 1000 for torchvision's."""
    if num_classes is not None and (isinstance(num_classes, bool) or not isinstance(num_classes, int)
                                    or num_classes < 1):
        raise ConfigError(f"num_classes must be a positive integer, got {num_classes!r}")
    key = _normalise(name)
    if key in _CIFAR:
        module, fn = _CIFAR[key]
        try:
            builder: Callable[..., nn.Module] = getattr(importlib.import_module(f".{module}", __name__), fn)
        except (ImportError, AttributeError) as e:  # e.g. an optional model module that is not installed
            raise ModelError(f"model {name!r} is not available: {e}") from e
        return builder(num_classes=_CIFAR_DEFAULT_CLASSES if num_classes is None else num_classes)
    if key not in _torchvision_names():
        raise _unknown(name)
    import torchvision.models

    kwargs = {} if num_classes is None else {"num_classes": num_classes}
    try:
        return torchvision.models.get_model(key, weights=None, **kwargs)
    except (TypeError, ValueError) as e:  # a builder that rejects an option
        raise ModelError(f"cannot build torchvision model {key!r}: {' '.join(str(e).split())}") from e


def default_preprocessing(name: str) -> Preprocessing:
    """Inputs a model expects when no checkpoint says otherwise.

    CIFAR models: 32x32, ImageNet mean/std (the normalisation the public CIFAR ResNet checkpoints were
    trained with). torchvision models: 224 with resize 256 and ImageNet mean/std, the classic ImageNet
    evaluation; models designed for another resolution (e.g. ``inception_v3``: 299, ``efficientnet_b3``: 300)
    take the crop/resize of their DEFAULT weights' transforms (torchvision metadata, nothing is downloaded).
    Newer torchvision weights of 224-models sometimes evaluate at resize 232; a checkpoint's stored
    preprocessing overrides this default."""
    key = _normalise(name)
    if key in _CIFAR:
        return Preprocessing(mean=IMAGENET_MEAN, std=IMAGENET_STD, input_size=32, resize=None)
    if key not in _torchvision_names():
        raise _unknown(name)
    size, resize = 224, 256
    mean, std = IMAGENET_MEAN, IMAGENET_STD
    try:
        import torchvision.models

        tf = torchvision.models.get_model_weights(key).DEFAULT.transforms()
        # ViTs built without weights have image_size 224 fixed by their position embeddings
        if int(tf.crop_size[0]) != size and not key.startswith("vit_"):
            size, resize = int(tf.crop_size[0]), int(tf.resize_size[0])
            mean, std = tuple(tf.mean), tuple(tf.std)
    except Exception:  # metadata is optional; fall back to the ImageNet standard
        pass
    return Preprocessing(mean=mean, std=std, input_size=size, resize=resize)
