"""MergeSpec: one merge of adapters as PEFT's add_weighted_adapter takes it, and which of its parameters each
method reads (server.adapters.merge runs it; the route refuses a parameter a method does not read)."""
from __future__ import annotations

from dataclasses import dataclass

SVD_METHODS = ("svd", "ties_svd", "dare_linear_svd", "dare_ties_svd", "magnitude_prune_svd")
DENSITY_METHODS = ("ties", "ties_svd", "dare_linear", "dare_ties", "dare_linear_svd", "dare_ties_svd",
                   "magnitude_prune", "magnitude_prune_svd")
SIGN_METHODS = ("ties", "ties_svd", "dare_ties", "dare_ties_svd")  # majority_sign_method applies
RANDOM_METHODS = ("dare_linear", "dare_ties", "dare_linear_svd", "dare_ties_svd")  # seed applies
METHODS = ("linear", "cat", *SVD_METHODS, *[m for m in DENSITY_METHODS if m not in SVD_METHODS])


@dataclass(frozen=True)
class MergeSpec:
    """One merge, as PEFT's add_weighted_adapter takes it. sources: (adapter, weight) pairs."""

    name: str
    method: str
    sources: tuple[tuple[str, float], ...]
    density: float | None = None
    majority_sign_method: str | None = None
    seed: int | None = None
    svd_rank: int | None = None
    svd_clamp: float | None = None

    def peft_arguments(self) -> dict:
        """add_weighted_adapter's keyword arguments beyond adapters, weights, adapter_name."""
        args = {"combination_type": self.method, "density": self.density, "svd_rank": self.svd_rank,
                "svd_clamp": self.svd_clamp}
        if self.majority_sign_method is not None:
            args["majority_sign_method"] = self.majority_sign_method
        return args
