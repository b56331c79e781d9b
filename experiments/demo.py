"""`vlsafe demo`: the main job, end to end on the embedded default (or on tiny models with `profile="tiny"`).

organism (built if not cached) → weight shift `llm-aligned` → `lvlm` (+ dynamics over `lvlm-step-N`, + the
task-vector cosine of VL adaptation vs post-hoc safety tuning) → probes on every organism checkpoint (text-only
and, for LVLMs, with an image) → causal localisation `llm-aligned` → `lvlm` (patching, text and with organism
scenes; image shift; the signals table) → behaviour on the shipped test sets → the remedies sweep (two-stage:
references, whole-LM merges, merges and LoRA targeted at each locate signal's top-k layers; text and image fronts) →
`report.html`.

Every stage goes through the same CLI a researcher would type, so the demo is also a worked example. A stage is
skipped when its outputs exist for the same arguments and the same checkpoint contents (`.demo_stage.json`);
the organism and the sweep resume on their own.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from vlsafe.analysis.errors import VlsafeError
from vlsafe.analysis.runinfo import write_json, write_run_json

CONFIGS = Path(__file__).resolve().parent / "configs"


@dataclass(frozen=True)
class Sizes:
    """How much of each shipped set the demo uses (the organism's full profile defines its own)."""

    probe_n: int
    eval_limit: int
    max_new_tokens: int
    pairs: int
    top_k: tuple[int, int, int]  # layers touched by the sweep's targeted points (k_small, k_mid, k_large)
    screen_limit: int            # prompts per set in the sweep's screening stage
    tune_limit: int              # prompts per training source of the sweep's targeted LoRA points
    lora_steps: int
    tune_max_length: int
    remedy_layers: tuple[int, int]  # the fixed block inputs of the sweep's activation remedies (mid, late; not 0,
                                    # where the last prompt tokens' states do not depend on the prompt)
    patch_signal: str               # the signals.csv column of the causal (patching) targeted points
    locate_n: int                   # harmful prompts of exact patching (text + scene, both directions: about
                                    # 28 s per prompt on 2 cores; 60 would take ~29 min)


SIZES = {"full": Sizes(probe_n=120, eval_limit=60, max_new_tokens=32, pairs=200, top_k=(3, 6, 10), screen_limit=30,
                       tune_limit=48, lora_steps=24, tune_max_length=112, remedy_layers=(15, 20),
                       patch_signal="patching_resid_scene", locate_n=16),
         "tiny": Sizes(probe_n=24, eval_limit=6, max_new_tokens=4, pairs=20, top_k=(1, 1, 1), screen_limit=6,
                       tune_limit=2, lora_steps=1, tune_max_length=384, remedy_layers=(1, 1),
                       patch_signal="patching_resid", locate_n=6)}


def _cli(argv: list[str]) -> None:
    from vlsafe.experiments.cli import main

    code = main(argv)
    if code != 0:
        raise VlsafeError(f"demo stage failed: vlsafe {' '.join(argv)} (exit {code})")


def _content_key(argv: list[str], checkpoints: list[Path], judged: bool = False) -> str:
    """The stage's cache key: its arguments, its checkpoints' contents and, for a judged stage, the default
    judge's version (`judges.keyed_fingerprint`: nothing for the version earlier keys were made with)."""
    from vlsafe.analysis.checkpoints import open_checkpoint
    from vlsafe.probes.behavior.judges import keyed_fingerprint

    fp = keyed_fingerprint("default") if judged else None
    h = hashlib.sha256(json.dumps(argv if fp is None else [*argv, fp]).encode())
    for c in checkpoints:
        h.update(open_checkpoint(c).content_hash().encode())
    return h.hexdigest()[:16]


class Stages:
    """Runs named stages with cache checks, time estimates from the previous run, and a time log."""

    def __init__(self, out: Path, echo: Callable[[str], None] = print):
        self.out, self.echo = out, echo
        self.times_file = out / "demo_times.json"
        self.previous = json.loads(self.times_file.read_text()) if self.times_file.is_file() else {}
        self.times: dict[str, float] = {}

    def run(self, name: str, argv: list[str], stage_dir: Path | None, checkpoints: list[Path], *,
            judged: bool = False) -> None:
        """Run stage `name` (`vlsafe ARGV`) unless `stage_dir` holds its outputs for the same key (`judged`: the
        stage's numbers come from the default judge, whose version then enters the key)."""
        est = self.previous.get(name)
        self.echo(f"[demo] {name:<10} " + (f"(last time {est:.0f}s)" if est is not None else "(first run)"))
        t0 = time.perf_counter()
        marker = stage_dir / ".demo_stage.json" if stage_dir else None
        key = _content_key(argv, checkpoints, judged) if marker else None
        if marker and marker.is_file() and json.loads(marker.read_text()).get("key") == key \
                and _lists_tables(stage_dir / "run.json"):
            self.echo(f"[demo] {name:<10} cached")
            if est is not None:  # keep the build time as the estimate, not the cache check's
                self.times[name] = est
        else:
            _cli(argv)
            if marker:
                write_json(marker, {"key": key, "argv": argv})
        self.times.setdefault(name, time.perf_counter() - t0)
        write_json(self.times_file, {**self.previous, **self.times})


def _lists_tables(run_json: Path) -> bool:
    """True when `run_json` exists and names its tables (an older vlsafe's stage output is rebuilt)."""
    return run_json.is_file() and "tables" in json.loads(run_json.read_text())


def _organism_checkpoints(org: Path) -> dict[str, Path]:
    names = ["llm-base", "llm-aligned", "lvlm", "lvlm-safety-posthoc", "lvlm-safety-mixed"]
    found = {n: org / n for n in names if (org / n / "config.json").is_file()}
    missing = [n for n in ("llm-aligned", "lvlm") if n not in found]
    if missing:
        raise VlsafeError(f"{org}: organism is missing {', '.join(missing)} (rerun `vlsafe organism -o {org}`)")
    return found


def _step_axis(profile: str, steps: list[Path]) -> str:
    """Stage-2 steps of llm-aligned (0: stage 1 leaves the LM as it is), each lvlm-step-N, and lvlm (the last)."""
    from vlsafe.analysis.dynamics import parse_step
    from vlsafe.experiments.organism import load_config

    last = load_config(profile).stage2.sft.steps
    return ",".join(str(s) for s in [0, *(parse_step(p.name) for p in steps), last])


def _steps(org: Path) -> list[Path]:
    from vlsafe.analysis.dynamics import parse_step

    steps = [p for p in org.glob("lvlm-step-*") if (p / "config.json").is_file()]
    return sorted(steps, key=lambda p: parse_step(p.name) or 0)


def _sweep_vars(org: Path, locate: Path, size: Sizes) -> list[str]:
    """`--var` options of the remedies sweep: the organism, the locate run whose signals.csv aims the targeted
    points (and whose vectors the activation remedies read), the gate conditions next to it, and the sizes."""
    pairs = {"organism": org, "locate": locate, "gates": locate.parent / "gate", "k_small": size.top_k[0],
             "k_mid": size.top_k[1],
             "k_large": size.top_k[2], "eval_limit": size.eval_limit, "screen_limit": size.screen_limit,
             "max_new_tokens": size.max_new_tokens, "tune_limit": size.tune_limit, "lora_steps": size.lora_steps,
             "tune_max_length": size.tune_max_length, "mid_layer": size.remedy_layers[0],
             "late_layer": size.remedy_layers[1], "patch_signal": size.patch_signal}
    return [a for k, v in pairs.items() for a in ("--var", f"{k}={v}")]


def run_demo(out: str | Path = "runs/demo", *, profile: str = "full", echo: Callable[[str], None] = print) -> Path:
    """Run the whole demo into `out` and return the path of `report.html`."""
    if profile not in SIZES:
        raise VlsafeError(f"unknown demo profile {profile!r} (expected one of {sorted(SIZES)})")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    size, org = SIZES[profile], out / "organism"
    st = Stages(out, echo)
    st.run("organism", ["organism", "--profile", profile, "-o", str(org)], None, [])
    ck = _organism_checkpoints(org)
    lvlms = [p for n, p in ck.items() if n.startswith("lvlm")]
    every = list(ck.values())
    steps = _steps(org)
    st.run("diff", ["diff", str(ck["llm-aligned"]), *map(str, steps), str(ck["lvlm"]), "--steps",
                    _step_axis(profile, steps), "-o", str(out / "diff")],
           out / "diff", [ck["llm-aligned"], *steps, ck["lvlm"]])
    if "lvlm-safety-posthoc" in ck:
        tv = [str(ck["lvlm"]), str(ck["lvlm-safety-posthoc"]), "--base", str(ck["llm-aligned"]), "--tv-mode", "chain"]
        st.run("taskvec", ["diff", *tv, "-o", str(out / "taskvec")], out / "taskvec",
               [ck["llm-aligned"], ck["lvlm"], ck["lvlm-safety-posthoc"]])
    st.run("probe", ["probe", *map(str, every), "--image", "blank", "--n", str(size.probe_n),
                     "--pairs", str(size.pairs), "-o", str(out / "probe")], out / "probe", every)
    st.run("locate", ["locate", str(ck["llm-aligned"]), str(ck["lvlm"]), "--image", "scene", "--n",
                      str(size.locate_n), "--diff", str(out / "diff"), "--probe", str(out / "probe"),
                      "-o", str(out / "locate")], out / "locate", [ck["llm-aligned"], ck["lvlm"]])
    st.run("gate", ["gate", str(ck["lvlm"]), *(a for ℓ in dict.fromkeys(size.remedy_layers)
                                                for a in ("--layer", str(ℓ))), "-o", str(out / "gate")],
           out / "gate", [ck["lvlm"]])
    gen = ["--limit", str(size.eval_limit), "--max-new-tokens", str(size.max_new_tokens)]
    st.run("eval", ["eval", *map(str, every), "--prompts", "harmful-test", "--prompts", "borderline-test",
                    "--prompts", "harmless-test", *gen, "-o", str(out / "eval")], out / "eval", every, judged=True)
    st.run("eval-img", ["eval", *map(str, lvlms), "--prompts", "harmful-test+blank", *gen,
                        "-o", str(out / "eval_image")], out / "eval_image", lvlms, judged=True)
    sweep = CONFIGS / "sweep-organism.yaml"
    st.run("sweep", ["sweep", str(sweep), "-o", str(out / "sweep"), "--resume", "--quiet",
                     *_sweep_vars(org, out / "locate", size)],
           None, [])
    write_run_json(out, kind="demo", tables={}, command="vlsafe demo",
                   config={"profile": profile, "sizes": size.__dict__},
                   checkpoints={n: str(p) for n, p in ck.items()}, extra={"stage_seconds": st.times})
    st.run("report", ["report", str(out), "--title", "vlsafe demo: the model organism"], None, [])
    return out / "report.html"
