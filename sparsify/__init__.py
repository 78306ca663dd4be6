"""sparsify: compile dense transformer and Mamba models into modality-routed ones."""
from sparsify import ops
from sparsify.frontends import mamba_ssm as _mamba_ssm_frontend
from sparsify.add_modality import add_modality
from sparsify.after_training import export, extract
from sparsify.drift import Drift, drift
from sparsify.api import consolidate, convert, load, save, verify
from sparsify.errors import CaptureError, InternalError, RoutingError, SparsifyError, VerificationError
from sparsify.passes.verify import VerifyReport
from sparsify.plan import RoutingPlan
from sparsify.routed_model import RoutedModel
from sparsify.sharding import fully_shard
from sparsify.token_modalities import modality_ids_from_tokens, token_modalities

_mamba_ssm_frontend.install()  # `import mamba_ssm` works without its CUDA extension (see the module)


def __getattr__(name: str):
    # Loaded on first use: tensor_parallel.py imports torch.distributed.tensor (and registers DTensor rules).
    if name == "parallelize_module":
        from sparsify.tensor_parallel import parallelize_module
        return parallelize_module
    raise AttributeError(f"module 'sparsify' has no attribute '{name}'")


__all__ = [
    "CaptureError", "Drift", "InternalError", "RoutedModel", "RoutingError", "RoutingPlan", "SparsifyError",
    "VerificationError", "VerifyReport", "add_modality", "consolidate", "convert", "drift", "export", "extract",
    "fully_shard", "load", "modality_ids_from_tokens", "ops", "parallelize_module", "save", "token_modalities", "verify",
]
