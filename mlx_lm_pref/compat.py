"""Every difference between the mlx, mlx-lm and transformers releases this package supports,
in one place: the supported mlx-lm range and the check that activation makes, and what the
rest of the package asks of a release that not every supported one has.

The supported mlx-lm range is declared once, in ``pyproject.toml``'s dependencies, and read
back here from the installed package metadata. This module imports no mlx-lm: the version
check runs before anything of mlx-lm is loaded.
"""

import importlib.metadata

import mlx.core as mx
from packaging.requirements import Requirement
from packaging.version import Version


class UnsupportedVersionError(ImportError):
    pass


def supported_range() -> Requirement:
    for spec in importlib.metadata.requires("mlx-lm-pref") or []:
        req = Requirement(spec)
        if req.name == "mlx-lm":
            return req
    raise RuntimeError("mlx-lm-pref's metadata declares no mlx-lm requirement.")


# mlx-lm before 0.30 needs transformers < 5: its ChatDataset takes apply_chat_template's
# result for token ids, and transformers 5 returns a BatchEncoding (a dict) there. A
# requirement cannot depend on another package's version, so pip cannot say this;
# activation does.
NEEDS_OLD_TRANSFORMERS = Version("0.30")


def check_version() -> None:
    """Raise ``UnsupportedVersionError`` unless the installed mlx-lm (and transformers for
    it) are supported."""
    req = supported_range()
    found = importlib.metadata.version("mlx-lm")
    if not req.specifier.contains(found, prereleases=True):
        lower_first = sorted(req.specifier, key=lambda s: s.operator.startswith("<"))
        wanted = ",".join(str(s) for s in lower_first)
        raise UnsupportedVersionError(
            f"mlx_lm_pref supports mlx-lm {wanted} but found mlx-lm {found}; "
            f"nothing was patched. Install a supported version: "
            f"pip install 'mlx-lm{wanted}'."
        )
    transformers = importlib.metadata.version("transformers")
    if Version(found) < NEEDS_OLD_TRANSFORMERS and Version(transformers).major >= 5:
        raise UnsupportedVersionError(
            f"mlx-lm {found} needs transformers < 5 (its chat datasets break on 5.x) but "
            f"found transformers {transformers}; nothing was patched. Run: "
            f"pip install 'transformers<5' (or install mlx-lm >= {NEEDS_OLD_TRANSFORMERS})."
        )


def has_fused_cross_entropy() -> bool:
    """``mx.fast.cross_entropy``: mlx 0.32.2 and later."""
    return hasattr(mx.fast, "cross_entropy")


def result_dtype(a: mx.Dtype, b: mx.Dtype) -> mx.Dtype:
    """The dtype of an operation on arrays of dtypes a and b (``mx.result_type`` is mlx
    0.31 and later): from a 0-d sum that is never evaluated."""
    return (mx.zeros((), a) + mx.zeros((), b)).dtype


def quantization(layer) -> dict:
    """A quantized layer's arguments for ``mx.quantized_matmul`` / ``mx.dequantize``:
    ``mode`` (affine, mxfp4, ...) where the release has quantization modes."""
    extra = {"mode": layer.mode} if hasattr(layer, "mode") else {}
    return dict(group_size=layer.group_size, bits=layer.bits, **extra)


def token_ids(encoded) -> list:
    """``apply_chat_template(..., tokenize=True)``'s token ids: a list before transformers
    5, a ``BatchEncoding`` (a mapping) from 5 on."""
    if isinstance(encoded, dict) or hasattr(encoded, "keys"):
        encoded = encoded["input_ids"]
    return list(encoded)


def resumable_loop() -> bool:
    """Whether mlx-lm's ``train`` counts its loop as ``range(1, args.iters + 1)``, the count
    a resumed run starts later (``patches/trainer.py``): every supported release does.
    """
    import inspect

    from mlx_lm.tuner import trainer

    return "range(1, args.iters + 1)" in inspect.getsource(
        inspect.unwrap(trainer.train)
    )
