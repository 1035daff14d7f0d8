"""``state_dict`` / ``load_state_dict`` of the masked optimizers: torch's format, plus a record of
the masks, so that saved state is never loaded into an optimizer with other masks."""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch import Tensor

from ._layout import flat_memory_view

STATE_DICT_FORMAT = 1


class CheckpointMixin:
    """Part of ``MaskedOptimizer``: checkpointing."""

    def state_dict(self) -> dict[str, Any]:
        sd = super().state_dict()
        sd["fishkern"] = {
            "format": STATE_DICT_FORMAT,
            "optimizer": type(self).__name__,
            "master_weights": self.master_weights,
            "masks": [
                [[lay.digests[i], lay.k(i), lay.params[i].numel()] for i in range(len(lay.params))]
                for lay in self._layouts
            ],
        }
        return sd

    def _check_saved_masks(self, masks: Any, saved_groups: list) -> None:
        """The saved per-parameter mask records must exist for every group and parameter and match
        this optimizer's masks: an empty or missing record must not pass as 'nothing to compare'."""
        if not isinstance(masks, list) or len(masks) != len(self._layouts):
            got = f"{len(masks)} groups" if isinstance(masks, list) else repr(type(masks).__name__)
            raise ValueError(
                f"state dict: the mask records ('fishkern'/'masks') must list {len(self._layouts)} param groups, got {got}; "
                "the saved state cannot be matched to this optimizer's masks"
            )
        for gi, (lay, saved, saved_masks) in enumerate(zip(self._layouts, saved_groups, masks)):
            if len(saved["params"]) != len(lay.params):
                raise ValueError(
                    f"param group {gi}: state dict has {len(saved['params'])} parameters, this optimizer {len(lay.params)}"
                )
            if not isinstance(saved_masks, list) or len(saved_masks) != len(lay.params):
                raise ValueError(
                    f"param group {gi}: the state dict's mask records must list {len(lay.params)} parameters, got "
                    f"{len(saved_masks) if isinstance(saved_masks, list) else type(saved_masks).__name__}"
                )
            for i, rec in enumerate(saved_masks):
                if not (isinstance(rec, (list, tuple)) and len(rec) == 3 and isinstance(rec[0], str)
                        and all(isinstance(x, int) and not isinstance(x, bool) for x in rec[1:])):
                    raise ValueError(f"param group {gi}, parameter {i}: malformed mask record {rec!r} in the state dict")
                digest, k, numel = rec
                if digest != lay.digests[i] or k != lay.k(i) or numel != lay.params[i].numel():
                    raise ValueError(
                        f"param group {gi}, parameter {i} (shape {tuple(lay.params[i].shape)}): the saved state "
                        f"belongs to a different mask (k={k}, {numel} entries, digest {digest}) than this "
                        f"optimizer's (k={lay.k(i)}, {lay.params[i].numel()} entries, digest {lay.digests[i]})"
                    )

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if not isinstance(state_dict, Mapping):
            raise TypeError(f"load_state_dict expects a dict (from state_dict()), got {type(state_dict).__name__}")
        meta = state_dict.get("fishkern")
        if not isinstance(meta, dict):
            raise ValueError(
                f"this state dict was not saved by a fishkern masked optimizer (no 'fishkern' entry); "
                f"{type(self).__name__} can only resume from its own state_dict()"
            )
        if meta.get("format") != STATE_DICT_FORMAT:
            raise ValueError(f"unsupported fishkern optimizer state format {meta.get('format')!r}")
        if meta.get("optimizer") != type(self).__name__:
            raise ValueError(f"state dict of a {meta.get('optimizer')} cannot be loaded into a {type(self).__name__}")
        saved_groups = state_dict.get("param_groups")
        saved_state = state_dict.get("state")
        if not isinstance(saved_groups, list) or not all(
            isinstance(g, Mapping) and isinstance(g.get("params"), list) for g in saved_groups
        ):
            raise ValueError("state dict: 'param_groups' must be a list of dicts, each with a 'params' list")
        if not isinstance(saved_state, Mapping):
            raise ValueError("state dict: 'state' must be a dict")
        if len(saved_groups) != len(self.param_groups):
            raise ValueError(f"state dict has {len(saved_groups)} param groups, this optimizer {len(self.param_groups)}")
        self._check_saved_masks(meta.get("masks"), saved_groups)
        # Validate everything before touching anything, so a bad state dict changes nothing.
        plan = []
        for gi, (lay, saved) in enumerate(zip(self._layouts, saved_groups)):
            names = self._state_buffer_names({**self.param_groups[gi], **saved})
            for i, pid in enumerate(saved["params"]):
                st = saved_state.get(pid)
                if st is None:
                    continue
                where = f"param group {gi}, parameter {i}"
                if not isinstance(st, Mapping):
                    raise ValueError(f"{where}: saved state must be a dict, got {type(st).__name__}")
                for name in names + (["master"] if "master" in st else []):
                    if name not in st:
                        raise ValueError(f"{where}: saved state lacks '{name}'")
                    v = st[name]
                    if not isinstance(v, Tensor) or not v.is_floating_point():
                        kind = f"a {v.dtype} tensor" if isinstance(v, Tensor) else f"a {type(v).__name__}"
                        raise ValueError(f"{where}: saved '{name}' must be a floating-point tensor, got {kind}")
                    if v.numel() != lay.k(i):
                        raise ValueError(
                            f"{where}: saved '{name}' has {v.numel()} entries, the mask selects {lay.k(i)}"
                        )
                # copies: `st` may hold views of this very optimizer's buffers (a live state_dict())
                saved_copy = {name: v.detach().clone() for name, v in st.items() if isinstance(v, Tensor) and name != "step"}
                saved_copy["step"] = _saved_step(st.get("step"), where)
                if i in lay.rank:  # a tensor the mask selects nothing of has no state to restore
                    plan.append((gi, i, saved_copy))
        self.state.clear()
        for gi, (group, saved) in enumerate(zip(self.param_groups, saved_groups)):
            for key, value in saved.items():
                if key != "params":
                    group[key] = value
            rt = self._runtime[gi]
            rt.buffers.clear()
            rt.steps = [0] * len(rt.steps)
            rt.step_tensor.zero_()
            self._drop_proxies(rt, self._layouts[gi], range(len(rt.proxies)))  # gathered gradients are discarded
            rt.grad_ready = [False] * len(rt.grad_ready)
            rt.started = [False] * len(rt.started)  # per-tensor lists now (uniform again below if they agree)
        touched = set()
        for gi, i, st in plan:
            lay, rt = self._layouts[gi], self._runtime[gi]
            bufs = self._ensure_buffers(gi, self.param_groups[gi])
            sl = lay.slice(i)
            for name, buf in bufs.items():
                if name in st:
                    buf[sl].copy_(st[name].reshape(-1))
            if "master" in bufs and "master" not in st and lay.params[i].dtype != lay.state_dtype:
                # saved without fp32 masters: start them from the parameter's current values
                bufs["master"][sl].copy_(flat_memory_view(lay.params[i]).index_select(0, lay.mem_indices[i]))
            step = st["step"]
            rt.steps[i] = step
            rt.started[i] = any(name in st for name in self._state_buffer_names(self.param_groups[gi]))
            rt.step_tensor[lay.rank[i]] = float(step)
            touched.add((gi, i))
        for gi, i in sorted(touched):
            self._publish_state(gi, i)
        for gi in range(len(self._layouts)):
            rt, lay = self._runtime[gi], self._layouts[gi]
            self._maybe_uniform(rt, lay)
            if rt.step_dev is not None:  # capturable: one step count per group, on the device
                if rt.uniform is None:
                    raise ValueError(
                        f"param group {gi}: the saved step counts differ between parameters; capturable=True keeps "
                        "one step count per group (load this state with capturable=False)"
                    )
                rt.step_dev.fill_(float(rt.uniform[0]))



def _saved_step(step: Any, where: str) -> int:
    """A saved step count as an int: a 0-d tensor or a number, integral and non-negative."""
    if isinstance(step, Tensor):
        if step.numel() != 1:
            raise ValueError(f"{where}: saved 'step' must be a scalar, got shape {tuple(step.shape)}")
        step = step.item()
    if isinstance(step, bool) or not isinstance(step, (int, float)) or step != step or step < 0 or step != int(step):
        raise ValueError(f"{where}: saved 'step' must be a non-negative whole number, got {step!r}")
    return int(step)


