"""sparsify: compile dense transformer and Mamba models into modality-routed ones."""
from sparsify import ops
from sparsify.api import convert, load, save, verify
from sparsify.errors import CaptureError, RoutingError, SparsifyError, VerificationError
from sparsify.passes.verify import VerifyReport
from sparsify.plan import RoutingPlan
from sparsify.routed_model import RoutedModel

__all__ = [
    "CaptureError", "RoutedModel", "RoutingError", "RoutingPlan", "SparsifyError", "VerificationError",
    "VerifyReport", "convert", "load", "ops", "save", "verify",
]
