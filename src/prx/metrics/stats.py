"""Statistics shared by the metrics, and their distributed bookkeeping (torchmetrics ``Metric``).

- Fréchet distance between Gaussians fitted to two feature sets (FID, FD-DINOv2), from float64
  sums Σx and Σxxᵀ kept as "sum" states: constant memory, all-reduced across ranks.
- RBF-kernel MMD (CMMD) from the features themselves, kept as "cat" states with each sample's
  global index; ``compute`` sorts by index, so the result does not depend on which rank saw
  which sample.

``compute()`` synchronises the states across ranks, so every rank must call it (a rank-0-only
compute hangs); every rank then gets the same value.
"""

from __future__ import annotations

import warnings

import torch
from torch import Tensor
from torchmetrics import Metric
from torchmetrics.utilities import dim_zero_cat

IMAGINARY_TOLERANCE = 1e-3  # of the trace term; above it the square root is numerically unreliable


def frechet_distance(mu1: Tensor, sigma1: Tensor, mu2: Tensor, sigma2: Tensor) -> tuple[float, float]:
    """d² = ‖μ1 − μ2‖² + tr(Σ1 + Σ2 − 2·(Σ1Σ2)^½), in float64. Returns (d², imaginary share).

    tr (Σ1Σ2)^½ is the sum of the square roots of the eigenvalues of Σ1Σ2, which are those of the
    symmetric LᵀΣ2L (Σ1 = LLᵀ, Cholesky) or, when Σ1 is singular, Σ1^½ Σ2 Σ1^½: symmetric
    eigenvalue problems, several times faster than a general eigendecomposition or scipy's sqrtm.
    The eigenvalues are ≥ 0 in exact arithmetic; numerically (rank-deficient covariances: fewer
    samples than dimensions) some come out slightly negative, and their square roots imaginary. The real part is
    used; the imaginary share Σ|Im √λ| / Σ Re √λ is returned,
    and a warning is raised when it exceeds ``IMAGINARY_TOLERANCE``.
    """
    mu1, mu2, sigma1, sigma2 = (t.double() for t in (mu1, mu2, sigma1, sigma2))
    sym1 = (sigma1 + sigma1.T) / 2
    factor, info = torch.linalg.cholesky_ex(sym1)  # Σ1 = LLᵀ: eig(Σ1Σ2) = eig(LᵀΣ2L); needs Σ1 definite
    if int(info) == 0:
        product = factor.T @ sigma2 @ factor
    else:  # rank-deficient (fewer samples than dimensions): Σ1^½ from its eigendecomposition
        w, v = torch.linalg.eigh(sym1)
        root1 = (v * w.clamp_min(0).sqrt()) @ v.T
        product = root1 @ sigma2 @ root1
    eigenvalues = torch.linalg.eigvalsh((product + product.T) / 2)
    roots = torch.complex(eigenvalues, torch.zeros_like(eigenvalues)).sqrt()
    trace_sqrt = roots.real.sum()
    imaginary = float(roots.imag.abs().sum() / trace_sqrt.abs().clamp_min(1e-12))
    if imaginary > IMAGINARY_TOLERANCE:
        warnings.warn(f"the matrix square root of the Fréchet distance has a large imaginary part "
                      f"({imaginary:.2e} of its trace): the covariances are ill-conditioned (too few samples?)",
                      RuntimeWarning, stacklevel=2)
    value = (mu1 - mu2).square().sum() + sigma1.trace() + sigma2.trace() - 2 * trace_sqrt
    return float(value), imaginary


def mean_and_covariance(total: Tensor, outer: Tensor, n: int) -> tuple[Tensor, Tensor]:
    """μ and the unbiased covariance (n − 1) from Σx and Σxxᵀ (float64)."""
    mu = total / n
    return mu, (outer - n * torch.outer(mu, mu)) / (n - 1)


def rbf_mmd(x: Tensor, y: Tensor, sigma: float = 10.0, block: int = 2048) -> float:
    """Squared MMD with k(a, b) = exp(−‖a − b‖² / (2σ²)), the biased (minimum-variance) estimator
    of Gretton et al. (2012), Eq. 5, as CMMD computes it: mean k over all pairs of x (diagonal
    included) + the same for y − 2·mean k(x, y). float64, in row blocks (bounded memory)."""
    x, y = x.double(), y.double()
    gamma = 1.0 / (2 * sigma**2)

    def kernel_mean(a: Tensor, b: Tensor) -> Tensor:
        b_sq = b.square().sum(1)
        total = a.new_zeros(())
        for start in range(0, a.shape[0], block):
            rows = a[start:start + block]
            d2 = rows.square().sum(1, keepdim=True) + b_sq[None] - 2 * rows @ b.T
            total = total + torch.exp(-gamma * d2).sum()
        return total / (a.shape[0] * b.shape[0])

    return float(kernel_mean(x, x) + kernel_mean(y, y) - 2 * kernel_mean(x, y))


class PrxMetric(Metric):
    """A torchmetrics Metric whose "cat" states are never empty lists when ranks synchronise.

    torchmetrics gathers an empty list as a 1-d float tensor; a rank that saw no sample (more
    ranks than batches) would then offer a tensor of another rank and dtype than its peers. Each
    cat state declares its trailing shape and dtype in ``_cat_shapes``; an empty one becomes a
    (0, …) tensor of that shape before the gather.
    """

    full_state_update = False
    is_differentiable = False
    _cat_shapes: dict[str, tuple[tuple[int, ...], torch.dtype]] = {}

    def set_extractor(self, extractor) -> None:
        """Attach the feature extractor without registering it as a submodule: moving or casting
        the metric's states (``metric.to``) leaves the (shared, maybe large) network where it is."""
        object.__setattr__(self, "extractor", extractor)

    def sync(self, *args, **kwargs):
        for name, (tail, dtype) in self._cat_shapes.items():
            value = getattr(self, name)
            if isinstance(value, list) and not value:
                value.append(torch.zeros((0, *tail), dtype=dtype, device=self.device))
        return super().sync(*args, **kwargs)


class FrechetMetric(PrxMetric):
    """Fréchet distance between the feature Gaussians of real and generated images.

    ``update(features, real)`` adds a batch of features; ``add_images(images, real)`` extracts them
    first with the attached extractor. States: float64 Σx, Σxxᵀ and counts per side, summed
    across ranks. ``compute()`` → {"value", "num_real", "num_fake", "imaginary"}.
    """

    higher_is_better = False
    min_samples_unbiased = 0  # below this many samples per side, warn that the value is biased

    def __init__(self, extractor=None, num_features: int | None = None, **kwargs):
        super().__init__(**kwargs)
        self.set_extractor(extractor)
        dim = num_features or extractor.dim
        self.num_features = dim
        for side in ("real", "fake"):
            self.add_state(f"{side}_sum", torch.zeros(dim, dtype=torch.float64), dist_reduce_fx="sum")
            self.add_state(f"{side}_outer", torch.zeros(dim, dim, dtype=torch.float64), dist_reduce_fx="sum")
            self.add_state(f"{side}_n", torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, features: Tensor, real: bool) -> None:
        f = features.detach().double().reshape(-1, self.num_features).to(self.real_sum.device)
        side = "real" if real else "fake"
        getattr(self, f"{side}_sum").add_(f.sum(0))
        getattr(self, f"{side}_outer").add_(f.T @ f)
        getattr(self, f"{side}_n").add_(f.shape[0])

    def add_images(self, images: Tensor, real: bool) -> Tensor:
        features = self.extractor(images)
        self.update(features, real)
        return features

    def compute(self) -> dict:
        n_real, n_fake = int(self.real_n), int(self.fake_n)
        if n_real < 2 or n_fake < 2:
            raise ValueError(f"a Fréchet distance needs at least 2 samples per side (got {n_real} real, {n_fake} "
                             f"generated)")
        mu1, s1 = mean_and_covariance(self.real_sum, self.real_outer, n_real)
        mu2, s2 = mean_and_covariance(self.fake_sum, self.fake_outer, n_fake)
        value, imaginary = frechet_distance(mu1, s1, mu2, s2)
        return {"value": torch.tensor(value, dtype=torch.float64), "num_real": torch.tensor(n_real),
                "num_fake": torch.tensor(n_fake), "imaginary": torch.tensor(imaginary, dtype=torch.float64)}

    def bias_warning(self, n: int) -> str | None:
        if n < self.min_samples_unbiased:
            return (f"{n} samples < {self.min_samples_unbiased}: the {self.num_features}-d covariance is "
                    f"rank-deficient and the value is biased upwards; compare only numbers with the same sample count")
        return None


class KernelMMDMetric(PrxMetric):
    """RBF-kernel MMD between the features of real and generated images (×``scale``).

    States: the features and each sample's global index, gathered ("cat") across ranks and
    sorted by index in ``compute()`` → {"value", "num_real", "num_fake"}.
    """

    higher_is_better = False

    def __init__(self, extractor=None, num_features: int | None = None, sigma: float = 10.0, scale: float = 1000.0,
                 **kwargs):
        super().__init__(**kwargs)
        self.set_extractor(extractor)
        self.num_features = num_features or extractor.dim
        self.sigma, self.scale = sigma, scale
        self._cat_shapes = {"real_features": ((self.num_features,), torch.float64),
                            "fake_features": ((self.num_features,), torch.float64),
                            "real_index": ((), torch.long), "fake_index": ((), torch.long)}
        for name in self._cat_shapes:
            self.add_state(name, [], dist_reduce_fx="cat")

    def update(self, features: Tensor, real: bool, index: Tensor | None = None) -> None:
        side = "real" if real else "fake"
        f = features.detach().double().reshape(-1, self.num_features)
        if index is None:  # no global index: keep the order of arrival on this rank
            seen = sum(t.shape[0] for t in getattr(self, f"{side}_index"))
            index = torch.arange(seen, seen + f.shape[0])
        getattr(self, f"{side}_features").append(f)
        getattr(self, f"{side}_index").append(torch.as_tensor(index, dtype=torch.long).reshape(-1).to(f.device))

    def add_images(self, images: Tensor, real: bool, index: Tensor | None = None) -> Tensor:
        features = self.extractor(images)
        self.update(features, real, index)
        return features

    def _sorted(self, side: str) -> Tensor:
        features = dim_zero_cat(getattr(self, f"{side}_features"))
        index = dim_zero_cat(getattr(self, f"{side}_index"))
        return features[torch.argsort(index, stable=True)]

    def compute(self) -> dict:
        x, y = self._sorted("real"), self._sorted("fake")
        if x.shape[0] < 1 or y.shape[0] < 1:
            raise ValueError("MMD needs at least one sample per side")
        value = self.scale * rbf_mmd(x, y, self.sigma)
        return {"value": torch.tensor(value, dtype=torch.float64), "num_real": torch.tensor(x.shape[0]),
                "num_fake": torch.tensor(y.shape[0])}
