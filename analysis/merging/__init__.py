"""Weight merging: mergekit-exact operators, mergekit-compatible plans with per-layer targeting, a streaming
executor that writes an HF checkpoint of the base's family, and plans built from measurements.

>>> from vlsafe.analysis.merging import load_plan, run_merge
>>> run_merge(load_plan("merge.yaml"), "runs/merged")          # HF checkpoint + mergekit.yaml + run.json
>>> from vlsafe.analysis.merging.plans import plan_restore_layers
>>> plan = plan_restore_layers("lvlm_dir", "llm_aligned_dir", layers=[10, 11, 12], alpha=0.5)
>>> from vlsafe.analysis.merging import load_merged
>>> lm = load_merged(plan)                                     # the same model, merged in memory: nothing written
"""

from vlsafe.analysis.merging.config import Conditional, LayerMap, MergePlan, ModelEntry, load_plan
from vlsafe.analysis.merging.executor import merged_tensors, plan_tensors, run_merge
from vlsafe.analysis.merging.memory import load_merged, merge_into, not_in_memory
from vlsafe.analysis.merging.methods import METHODS, method_spec

__all__ = ["Conditional", "LayerMap", "MergePlan", "ModelEntry", "load_plan", "run_merge", "plan_tensors",
           "merged_tensors", "merge_into", "load_merged", "not_in_memory", "METHODS", "method_spec"]
