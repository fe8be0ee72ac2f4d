"""Client-side training signals, usable in any torch training loop.

``ImportanceTracker`` collects LIVAR's layer importances omega_A^l, omega_B^l (Section 4.1,
following Synaptic Intelligence [31]): running sums over optimizer steps of the product of the
gradient and the parameter update of each LoRA matrix. ``ClassFeatureStats`` collects the per-class
mean feature variance sigma^(c) (Section 4.2).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal, NamedTuple

import numpy as np
import numpy.typing as npt
import torch
from torch.utils.hooks import RemovableHandle

from livar_merge.errors import ClientUpdateError, ConfigError, GlobalStateError
from livar_merge.lora_view import ADAPTER, find_lora_parameters

Reduction = Literal["matrix", "elementwise"]


@dataclass(frozen=True)
class LayerImportance:
    """omega_A, omega_B ``[layers]`` (float64) for ``layer_names``, over ``steps`` steps."""

    layer_names: tuple[str, ...]
    omega_a: npt.NDArray[np.float64]
    omega_b: npt.NDArray[np.float64]
    steps: int


class _StepBuffers(NamedTuple):
    """Flat work buffers of :class:`ImportanceTracker`, allocated at the first step."""

    grad: torch.Tensor  # [all LoRA entries], gradients (unscaled)
    before: torch.Tensor  # [all LoRA entries], parameters before the step
    after: torch.Tensor  # [all LoRA entries], parameters after the step
    per_matrix: torch.Tensor  # [2 * layers] float64, this step's sum per matrix


class ImportanceTracker:
    """Running sums of gradient x update per LoRA matrix (omega_A^l, omega_B^l).

    Per optimizer step and LoRA matrix ``theta`` with gradient ``g``:

    * ``reduction="matrix"`` (default, the released code's definition):
      ``omega += |sum_ij g_ij * (theta_before_ij - theta_after_ij)|``;
    * ``reduction="elementwise"``: ``omega += sum_ij |g_ij * (theta_before_ij - theta_after_ij)|``.

    The update is whatever the optimizer did (AdamW's weight decay included). Attach to an
    optimizer with :meth:`attach`: its step pre/post hooks run inside ``optimizer.step()``, after
    ``GradScaler.step`` has unscaled the gradients, and not at all for steps GradScaler skips, so
    the loss scale never leaks into omega. Loops that scale by hand can call
    :meth:`before_step` (passing ``grad_scale``) and :meth:`after_step` themselves.

    Everything stays on the parameters' device; :meth:`result` makes the single host copy.
    ``cumulative=False`` (paper, per round) makes :meth:`start_round` reset the sums;
    ``cumulative=True`` keeps one total over all rounds as the released code does.

    Args:
        layers: ``{layer: (A parameter, B parameter)}``, or a peft model (its LoRA layers).
    """

    def __init__(
        self,
        layers: Mapping[str, tuple[torch.Tensor, torch.Tensor]] | torch.nn.Module,
        *,
        reduction: Reduction = "matrix",
        cumulative: bool = False,
        adapter_name: str = ADAPTER,
    ) -> None:
        if isinstance(layers, torch.nn.Module):
            layers = find_lora_parameters(layers, adapter_name)
        if not layers:
            raise GlobalStateError("ImportanceTracker found no LoRA layers to track")
        if reduction not in ("matrix", "elementwise"):
            raise ConfigError(f"reduction must be 'matrix' or 'elementwise', got {reduction!r}")
        self.layer_names = tuple(layers)
        # Order: A of every layer, then B of every layer.
        self._params = [layers[n][0] for n in self.layer_names] + [
            layers[n][1] for n in self.layer_names
        ]
        device = self._params[0].device
        sizes = torch.tensor([p.numel() for p in self._params], device=device)
        self._segments = torch.repeat_interleave(
            torch.arange(len(self._params), device=device), sizes
        )
        self.reduction = reduction
        self.cumulative = cumulative
        self._omega = torch.zeros(len(self._params), dtype=torch.float64, device=device)
        self._steps = 0
        self._dtype = torch.promote_types(self._params[0].dtype, torch.float32)
        self._buffers: _StepBuffers | None = None
        self._pending = False
        self._handles: list[RemovableHandle] = []

    # -------------------------------------------------------------- hooks
    def attach(self, optimizer: torch.optim.Optimizer) -> ImportanceTracker:
        """Track every ``optimizer.step()`` through its pre/post step hooks."""
        self._handles += [
            optimizer.register_step_pre_hook(lambda *_: self.before_step()),
            optimizer.register_step_post_hook(lambda *_: self.after_step()),
        ]
        return self

    def detach(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def before_step(self, grad_scale: float | torch.Tensor | None = None) -> None:
        """Snapshot gradients (divided by ``grad_scale`` if still scaled) and parameters.

        Both go into buffers allocated once; the step costs three flat copies, one fused
        multiply and one segmented sum, with no host synchronisation.
        """
        buffers = self._buffers
        if buffers is None:
            size = int(self._segments.numel())
            grad = torch.empty(size, dtype=self._dtype, device=self._params[0].device)
            buffers = self._buffers = _StepBuffers(
                grad=grad,
                before=torch.empty_like(grad),
                after=torch.empty_like(grad),
                per_matrix=torch.empty_like(self._omega),
            )
        grads = [
            p.grad.reshape(-1) if p.grad is not None else torch.zeros_like(p).reshape(-1)
            for p in self._params
        ]
        torch.cat(grads, out=buffers.grad)
        if grad_scale is not None:
            buffers.grad.div_(grad_scale)
        torch.cat([p.detach().reshape(-1) for p in self._params], out=buffers.before)
        self._pending = True

    @torch.no_grad()
    def after_step(self) -> None:
        """Add this step's gradient x update to the running sums."""
        buffers = self._buffers
        if not self._pending or buffers is None:
            raise RuntimeError("ImportanceTracker.after_step() without before_step()")
        self._pending = False
        torch.cat([p.detach().reshape(-1) for p in self._params], out=buffers.after)
        products = buffers.before.sub_(buffers.after).mul_(buffers.grad).double()
        if self.reduction == "elementwise":
            products.abs_()
        buffers.per_matrix.zero_().index_add_(0, self._segments, products)
        self._omega.add_(buffers.per_matrix.abs_())
        self._steps += 1

    # -------------------------------------------------------------- state
    def start_round(self) -> None:
        """Call at the start of each round's local training; resets unless ``cumulative``."""
        if not self.cumulative:
            self.reset()

    def reset(self) -> None:
        self._omega.zero_()
        self._steps = 0

    def result(self) -> LayerImportance:
        """omega_A and omega_B per layer (one device-to-host copy)."""
        omega = self._omega.cpu().numpy().copy()
        half = len(self.layer_names)
        return LayerImportance(self.layer_names, omega[:half], omega[half:], self._steps)

    def state_dict(self) -> dict[str, Any]:
        return {
            "omega": self._omega.cpu().clone(),
            "steps": self._steps,
            "layer_names": list(self.layer_names),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if list(state["layer_names"]) != list(self.layer_names):
            raise ClientUpdateError("ImportanceTracker state was saved for different LoRA layers")
        self._omega.copy_(state["omega"].to(self._omega.device, torch.float64))
        self._steps = int(state["steps"])


@dataclass(frozen=True)
class ClassStatistics:
    """Per-class results: ``count [C]`` (samples used), ``sigma [C]`` (mean over feature
    dimensions of the unbiased per-dimension variance; NaN where absent), ``present [C]``
    (``count >= 2``), ``mean [C, D]`` and ``variance [C, D]`` (float64)."""

    count: npt.NDArray[np.int64]
    sigma: npt.NDArray[np.float64]
    present: npt.NDArray[np.bool_]
    mean: npt.NDArray[np.float64]
    variance: npt.NDArray[np.float64]


class ClassFeatureStats:
    """Streaming per-class mean and variance of features (float64, Chan et al.'s merge).

    ``update(features [N, D], labels [N], predictions [N] | logits [N, C])`` accumulates; with
    ``only_correct=True`` (paper, default) only correctly classified samples count, with
    ``False`` (released code) all. sigma^(c) is the mean over dimensions of the unbiased variance.
    Classes with fewer than 2 samples are reported absent.
    """

    def __init__(self, num_classes: int, *, only_correct: bool = True, ddof: int = 1) -> None:
        self.num_classes = num_classes
        self.only_correct = only_correct
        self.ddof = ddof
        self._count: torch.Tensor | None = None
        self._mean: torch.Tensor | None = None
        self._m2: torch.Tensor | None = None

    def reset(self) -> None:
        self._count = self._mean = self._m2 = None

    @torch.no_grad()
    def update(
        self,
        features: torch.Tensor,
        labels: torch.Tensor,
        predictions: torch.Tensor | None = None,
    ) -> None:
        """Add a batch. ``predictions``: class ids ``[N]`` or logits ``[N, C]``."""
        if features.ndim != 2 or labels.shape != features.shape[:1]:
            raise ClientUpdateError(
                f"features must be [N, D] and labels [N]; got {tuple(features.shape)}, "
                f"{tuple(labels.shape)}"
            )
        labels = labels.long()
        if self.only_correct:
            if predictions is None:
                raise ConfigError("only_correct=True needs predictions or logits")
            if predictions.ndim == 2:
                predictions = predictions.argmax(dim=1)
            keep = predictions == labels
            features, labels = features[keep], labels[keep]
        if labels.numel() and (labels.min() < 0 or labels.max() >= self.num_classes):
            raise ClientUpdateError(f"labels outside [0, {self.num_classes})")
        x = features.detach().double()
        c, d = self.num_classes, x.shape[1]
        if self._count is None:
            self._count = torch.zeros(c, dtype=torch.float64, device=x.device)
            self._mean = torch.zeros(c, d, dtype=torch.float64, device=x.device)
            self._m2 = torch.zeros(c, d, dtype=torch.float64, device=x.device)
        assert self._mean is not None and self._m2 is not None
        if labels.numel() == 0:
            return
        n_b = torch.zeros(c, dtype=torch.float64, device=x.device).index_add_(
            0, labels, torch.ones_like(labels, dtype=torch.float64)
        )
        sum_b = torch.zeros(c, d, dtype=torch.float64, device=x.device).index_add_(0, labels, x)
        mean_b = sum_b / n_b.clamp(min=1)[:, None]
        m2_b = torch.zeros_like(sum_b).index_add_(0, labels, (x - mean_b[labels]) ** 2)
        n_a = self._count
        n = n_a + n_b
        delta = mean_b - self._mean
        frac_b = (n_b / n.clamp(min=1))[:, None]
        self._mean += delta * frac_b
        self._m2 += m2_b + delta**2 * (n_a[:, None] * frac_b)
        self._count = n

    def result(self) -> ClassStatistics:
        """Per-class statistics (host copies, float64)."""
        if self._count is None:
            nan = np.full(self.num_classes, np.nan)
            return ClassStatistics(
                np.zeros(self.num_classes, np.int64),
                nan,
                np.zeros(self.num_classes, bool),
                np.zeros((self.num_classes, 0)),
                np.zeros((self.num_classes, 0)),
            )
        assert self._mean is not None and self._m2 is not None
        count = self._count.cpu().numpy()
        present = count >= max(2, self.ddof + 1)
        denom = np.where(present, count - self.ddof, 1.0)[:, None]
        variance = np.where(present[:, None], self._m2.cpu().numpy() / denom, np.nan)
        sigma = np.full(self.num_classes, np.nan)
        sigma[present] = variance[present].mean(axis=1)
        return ClassStatistics(
            count=count.astype(np.int64),
            sigma=sigma,
            present=present,
            mean=self._mean.cpu().numpy().copy(),
            variance=variance,
        )
