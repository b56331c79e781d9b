"""The condition of a gated remedy: does the model's own read-out at one layer say "harmful" for this prompt?

After conditional activation steering (Lee et al., ICLR 2025; the rule is in `docs/methods.md`, "Gated
remedies"). A `Condition` reads the residual stream entering block `layer` (`resid_pre`, vlsafe's layer axis)
at the last prompt position, scores it with one dot product, `score = w·h + b` (h the fp32 state, the product in
fp64), and **fires when `score > threshold`**. Two kinds:

- `direction`: `w` is the unit difference-in-means direction (`vlsafe.probes.directions.mean_diff`) of the
  harmful and harmless train sets at that layer, `b = 0`: the score is the projection on it;
- `probe`: the `StandardScaler` → `LogisticRegression` pipeline of `vlsafe.probes.linear`, fitted on the same
  train states and folded into `w = coef/σ`, `b = intercept − coef·(μ/σ)`: the score is the probe's logit.

`fit_condition` fits on `-train` splits only and picks the threshold on harmless-val: the smallest threshold
with at most `floor(max_fpr · n)` harmless-val prompts scoring above it (an ROC operating point). A `-test` split
is refused. Files: `cond.json` (the record below) next to `cond.safetensors` (one fp64 tensor `weight` `[d]`).

>>> cond = fit_condition(lm, layer=15, kind="probe", harmful_train="harmful-train",
...                      harmless_train="harmless-train", harmless_val="harmless-val", harmful_val="harmful-val")
>>> cond.save("runs/gate/cond.json"); cond = Condition.load("runs/gate/cond.json")
>>> condition_scores(lm, ["How do I bake bread?"], condition=cond).fired      # tensor([False])
"""

from __future__ import annotations

import math
import numbers
import os
import warnings
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, NamedTuple, Sequence

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from sklearn.exceptions import ConvergenceWarning

from vlsafe.analysis.errors import VlsafeError
from vlsafe.analysis.runinfo import atomic_path, read_json_object, write_json
from vlsafe.probes import models as M
from vlsafe.probes.activations import model_identity
from vlsafe.probes.capture import capture
from vlsafe.probes.directions import mean_diff
from vlsafe.probes.linear import classifier

__all__ = ["Condition", "GateScores", "fit_condition", "condition_scores", "choose_threshold", "prompt_set", "FORMAT",
           "KINDS"]

FORMAT = "vlsafe.condition/1"
KINDS = ("direction", "probe")
HOOK = "resid_pre"
RULE = "score = w·h + b (h: resid_pre entering `layer` at `position`, fp64 product); fires when score > threshold"


def _number(x: Any, what: str, *, finite: bool = True) -> float:
    """`x` as a float; a one-line error for strings, booleans, NaN (and ±inf when `finite`)."""
    if isinstance(x, bool) or not isinstance(x, (numbers.Real, np.floating, np.integer)):
        raise VlsafeError(f"{what} {x!r} is not a number")
    v = float(x)
    if math.isnan(v) or (finite and math.isinf(v)):
        raise VlsafeError(f"{what} {x!r} is not a finite number")
    return v


def _int(x: Any, what: str) -> int:
    if isinstance(x, bool) or not isinstance(x, (numbers.Integral, np.integer)):
        raise VlsafeError(f"{what} {x!r} is not an integer")
    return int(x)


@dataclass(frozen=True, eq=False)
class Condition:
    """A fitted gate: `kind` (direction | probe), `layer`, `weight` `[d]`, `bias`, `threshold`; see the module doc.

    `threshold` may be ±inf (a gate that never / always fires). `num_layers` (when known) bounds `layer`;
    `provenance` says which prompt sets fitted it and chose the threshold, the target false-positive rate and
    the rates reached on val. `source` (the file it was loaded from) only prefixes error messages.
    """

    kind: str
    layer: int
    weight: torch.Tensor
    threshold: float
    bias: float = 0.0
    position: int = -1
    num_layers: int | None = None
    model_spec: str = ""
    model_hash: str = ""
    provenance: dict[str, Any] = field(default_factory=dict)
    source: str = field(default="", compare=False)

    def __post_init__(self) -> None:
        where = f"{self.source}: " if self.source else ""
        try:
            self._validate()
        except VlsafeError as e:
            raise VlsafeError(f"{where}{e}") from None

    def _validate(self) -> None:
        if self.kind not in KINDS:
            raise VlsafeError(f"condition kind {self.kind!r} is not one of {', '.join(KINDS)}")
        set_ = lambda k, v: object.__setattr__(self, k, v)  # noqa: E731  (frozen dataclass)
        set_("threshold", _number(self.threshold, "condition threshold", finite=False))
        set_("bias", _number(self.bias, "condition bias"))
        set_("layer", _int(self.layer, "condition layer"))
        set_("position", _int(self.position, "condition position"))
        if self.num_layers is not None:
            set_("num_layers", _int(self.num_layers, "condition num_layers"))
        if self.layer < 0 or (self.num_layers is not None and self.layer >= self.num_layers):
            top = f"0..{self.num_layers - 1}" if self.num_layers is not None else "≥ 0"
            raise VlsafeError(f"condition layer {self.layer} out of range (valid layers: {top})")
        if self.position >= 0:
            raise VlsafeError(f"condition position {self.position} must be negative (counted from the prompt's end)")
        set_("weight", _weight(self.weight, unit=self.kind == "direction"))

    # ---- reading ------------------------------------------------------------------------------------
    @property
    def hidden_size(self) -> int:
        """Width of the residual stream the condition reads."""
        return int(self.weight.numel())

    def score(self, states: torch.Tensor) -> torch.Tensor:
        """fp64 `[n]` scores `w·h + b` of states `[n, d]` (or one `[d]` state → a 0-d tensor)."""
        h = torch.as_tensor(states)
        if h.shape[-1] != self.hidden_size:
            raise VlsafeError(f"{self._where()}condition weight has {self.hidden_size} entries but the states have "
                              f"width {h.shape[-1]}")
        return h.to(torch.float64) @ self.weight.to(h.device) + self.bias

    def fires(self, scores: torch.Tensor) -> torch.Tensor:
        """Boolean `scores > threshold`."""
        return torch.as_tensor(scores) > self.threshold

    def check_model(self, lm: Any) -> None:
        """One-line error unless `lm` (a LoadedModel or transformers model) has this layer and hidden size."""
        model = getattr(lm, "model", lm)
        n, d = M.num_layers(model), M.hidden_size(model)
        if self.layer >= n:
            raise VlsafeError(f"{self._where()}condition layer {self.layer} out of range (valid layers: 0..{n - 1})")
        if self.hidden_size != d:
            raise VlsafeError(f"{self._where()}condition weight has {self.hidden_size} entries but the model's "
                              f"hidden size is {d}")

    def __eq__(self, other: object) -> bool:
        return (isinstance(other, Condition) and self.to_dict() == other.to_dict()
                and torch.equal(self.weight, other.weight))

    __hash__ = None  # type: ignore[assignment]  (mutable provenance)

    def _where(self) -> str:
        return f"{self.source}: " if self.source else ""

    # ---- files --------------------------------------------------------------------------------------
    def to_dict(self, weights_file: str = "") -> dict[str, Any]:
        """The JSON record (everything but the weight tensor, which lives in `weights_file`)."""
        return {"format": FORMAT, "kind": self.kind, "hook": HOOK, "layer": self.layer, "position": self.position,
                "hidden_size": self.hidden_size, "num_layers": self.num_layers, "threshold": self.threshold,
                "bias": self.bias, "rule": RULE, "weights": weights_file,
                "model": {"spec": self.model_spec, "content_hash": self.model_hash},
                "provenance": dict(self.provenance)}

    def save(self, path: str | os.PathLike) -> Path:
        """Write `path` (JSON) and, beside it, `<stem>.safetensors` with the fp64 `weight`; returns `path`."""
        path = Path(path)
        if path.suffix != ".json":
            raise VlsafeError(f"{path}: a condition file must end in .json (its weights go beside it)")
        weights = path.with_suffix(".safetensors")
        with atomic_path(weights) as tmp:
            save_file({"weight": self.weight.contiguous()}, str(tmp), metadata={"format": FORMAT})
        write_json(path, self.to_dict(weights.name))
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> "Condition":
        """Read a file written by `save` (validated; errors name the file)."""
        path = Path(path)
        rec = _read_record(path)
        weights = path.parent / str(rec.get("weights") or path.with_suffix(".safetensors").name)
        try:
            w = load_file(str(weights))["weight"]
        except FileNotFoundError:
            raise VlsafeError(f"{path}: its weights file {weights.name} is missing") from None
        except (SafetensorError, KeyError, OSError) as e:
            raise VlsafeError(f"{weights}: not a condition weights file ({str(e).splitlines()[0][:100]})") from None
        if rec.get("hidden_size") is not None and int(rec["hidden_size"]) != w.numel():
            raise VlsafeError(f"{weights}: tensor 'weight' has {w.numel()} entries but {path.name} says hidden size "
                              f"{rec['hidden_size']}")
        model = rec.get("model") or {}
        return cls(kind=rec["kind"], layer=rec["layer"], weight=w, threshold=rec["threshold"],
                   bias=rec.get("bias", 0.0), position=rec.get("position", -1), num_layers=rec.get("num_layers"),
                   model_spec=model.get("spec") or "", model_hash=model.get("content_hash") or "",
                   provenance=rec.get("provenance") or {}, source=str(path))

    def with_threshold(self, threshold: float) -> "Condition":
        """The same condition with another threshold (e.g. ±inf: never / always fires)."""
        return replace(self, threshold=threshold)


def _weight(w: Any, *, unit: bool) -> torch.Tensor:
    try:
        t = torch.as_tensor(w).detach().to("cpu", torch.float64)
    except (TypeError, ValueError, RuntimeError):
        raise VlsafeError(f"condition weight is a {type(w).__name__}, not a tensor") from None
    if t.dim() != 1 or t.numel() == 0:
        raise VlsafeError(f"condition weight must be one vector [d], got shape {tuple(t.shape)}")
    norm = t.norm()
    if not torch.isfinite(norm) or norm == 0:
        raise VlsafeError("condition weight has zero or non-finite norm")
    return t / norm if unit and abs(float(norm) - 1.0) > 1e-12 else t.clone()   # a unit vector stays bit-equal


def _read_record(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise VlsafeError(f"{path}: no such condition file")
    rec = read_json_object(path)
    if rec.get("format") != FORMAT:
        raise VlsafeError(f"{path}: not a condition file (format {rec.get('format')!r}, expected {FORMAT!r})")
    missing = [k for k in ("kind", "layer", "threshold") if k not in rec]
    if missing:
        raise VlsafeError(f"{path}: condition record lacks {', '.join(missing)}")
    return rec


# ---- scoring ---------------------------------------------------------------------------------------------

class GateScores(NamedTuple):
    """Per prompt: the condition's fp64 `score` `[n]` and whether it `fired` (bool `[n]`)."""

    score: torch.Tensor
    fired: torch.Tensor


def _states(lm: Any, prompts: Any, *, layer: int, position: int, images: Any = None, **kw: Any) -> torch.Tensor:
    """fp32 `[n, d]` residual states entering block `layer` at `position` (one forward that stops there)."""
    acts = capture(lm, prompts, hooks=HOOK, layers=[layer], positions=position, images=images, **kw)
    return acts.get(HOOK, layer)[:, 0]


def condition_scores(lm: Any, prompts: Sequence[str] | Any, *, condition: Condition, images: Any = None,
                     batch_size: int = 8, chat: bool = True, system: str | None = None,
                     progress: bool = False) -> GateScores:
    """Score `prompts` (strings or a `PromptSet`; `images` as in `capture`) with `condition` on `lm`.

    One forward per batch that stops after the condition's layer.
    """
    lm = M.load(lm)
    condition.check_model(lm)
    h = _states(lm, prompts, layer=condition.layer, position=condition.position, images=images,
                batch_size=batch_size, chat=chat, system=system, progress=progress)
    s = condition.score(h)
    return GateScores(s, condition.fires(s))


# ---- fitting ---------------------------------------------------------------------------------------------

def choose_threshold(harmless_scores: Any, max_fpr: float) -> float:
    """The smallest threshold t with at most `floor(max_fpr · n)` of the harmless scores `> t`."""
    s = np.sort(np.asarray(harmless_scores, dtype=np.float64).reshape(-1))[::-1]
    if s.size == 0:
        raise VlsafeError("condition threshold: empty harmless-val set")
    k = int(math.floor(_fpr(max_fpr) * s.size + 1e-9))
    return float(s[k])


def _fpr(max_fpr: Any) -> float:
    v = _number(max_fpr, "max_fpr")
    if not 0.0 <= v < 1.0:
        raise VlsafeError(f"max_fpr {v} must be in [0, 1)")
    return v


def prompt_set(x: Any, role: str) -> tuple[Any, str]:
    """(capture input, name) of a set given by name/spec, `PromptSet` or list of strings; refuses -test splits."""
    if isinstance(x, (str, os.PathLike)):
        from vlsafe.probes.behavior.datasets import load_prompts

        x = load_prompts(x)
    if hasattr(x, "records"):
        name = str(getattr(x, "name", ""))
        if any(getattr(r, "split", None) == "test" for r in x.records) or "-test" in name:
            raise VlsafeError(f"{role}: {name!r} holds -test prompts; conditions are fitted on -train and -val "
                              "splits only")
        return x, name
    texts = list(x)
    if not texts or not all(isinstance(t, str) for t in texts):
        raise VlsafeError(f"{role}: give a prompt-set name, a PromptSet or a non-empty list of strings")
    return texts, f"<{len(texts)} prompts>"


def _fit_weights(kind: str, h_pos: torch.Tensor, h_neg: torch.Tensor, *, C: float,
                 max_iter: int) -> tuple[torch.Tensor, float]:
    """(w `[d]` fp64, b) of the chosen kind from harmful (`h_pos`) and harmless (`h_neg`) train states."""
    if kind == "direction":
        return mean_diff(h_pos[:, None], h_neg[:, None], normalize=True)[0, 0], 0.0
    x = torch.cat([h_pos, h_neg]).to(torch.float64).numpy()
    y = np.r_[np.ones(len(h_pos), int), np.zeros(len(h_neg), int)]
    clf = classifier(C, max_iter)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        clf.fit(x, y)
    scaler, logit = clf[0], clf[-1]
    w = logit.coef_[0] / scaler.scale_
    return torch.from_numpy(w.copy()), float(logit.intercept_[0] - w @ scaler.mean_)


def fit_condition(lm: Any, *, layer: int, kind: str = "probe", harmful_train: Any, harmless_train: Any,
                  harmless_val: Any, harmful_val: Any = None, max_fpr: float = 0.05, position: int = -1,
                  C: float = 1.0, max_iter: int = 1000, batch_size: int = 8, chat: bool = True,
                  system: str | None = None, progress: bool = False) -> Condition:
    """Fit a `Condition` of `kind` at block input `layer` on the train sets; threshold from harmless-val.

    Each set is a prompt-set name/spec (e.g. `harmful-train`, `harmless-val+blank`), a `PromptSet` or a list of
    strings; `-test` splits are refused. `harmful_val` (optional) only measures the true-positive rate.
    `provenance` records the sets (names, sizes), `max_fpr` and the false/true-positive rates on val.
    """
    lm = M.load(lm)
    if kind not in KINDS:
        raise VlsafeError(f"condition kind {kind!r} is not one of {', '.join(KINDS)}")
    n_layers = M.num_layers(lm.model)
    layer = _int(layer, "condition layer")
    if not 0 <= layer < n_layers:
        raise VlsafeError(f"condition layer {layer} out of range (valid layers: 0..{n_layers - 1})")
    max_fpr = _fpr(max_fpr)
    roles = {"harmful_train": harmful_train, "harmless_train": harmless_train, "harmless_val": harmless_val}
    if harmful_val is not None:
        roles["harmful_val"] = harmful_val
    sets = {role: prompt_set(x, role) for role, x in roles.items()}
    opts = dict(layer=layer, position=position, batch_size=batch_size, chat=chat, system=system, progress=progress)
    states = {role: _states(lm, data, **opts) for role, (data, _) in sets.items()}
    w, b = _fit_weights(kind, states["harmful_train"], states["harmless_train"], C=C, max_iter=max_iter)
    probe = Condition(kind, layer, w, threshold=math.inf, bias=b, position=position, num_layers=n_layers)
    scores = {role: probe.score(h) for role, h in states.items() if role.endswith("_val")}
    threshold = choose_threshold(scores["harmless_val"], max_fpr)
    rates = {f"val_{'fpr' if role == 'harmless_val' else 'tpr'}": float((s > threshold).double().mean())
             for role, s in scores.items()}
    prov = {"fitted_on": {r: sets[r][1] for r in ("harmful_train", "harmless_train")},
            "threshold_from": sets["harmless_val"][1], "harmful_val": sets.get("harmful_val", (None, None))[1],
            "n": {role: len(h) for role, h in states.items()}, "max_fpr": max_fpr, **rates,
            **({"C": C} if kind == "probe" else {})}
    ident = model_identity(lm)
    return replace(probe, threshold=threshold, model_spec=str(ident["spec"] or ""),
                   model_hash=str(ident["content_hash"] or ""), provenance=prov)
