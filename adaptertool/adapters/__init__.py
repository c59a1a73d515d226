"""Adapter formats and their pure tensor maths (no file access). Names load on first use."""

from adaptertool._lazy import lazy_exports

__all__, __getattr__ = lazy_exports(__name__, {
    "combine": ("METHODS", "combine_task_vectors", "dare_drop", "magnitude_trim", "stack_factors", "ties_merge"),
    "expert_lora": ("ParamLora", "expert_delta", "expert_factors", "fuse_gate_up", "plan_param_loras", "split_gate_up",
                    "stack_experts"),
    "experts": ("FAMILIES", "LAYOUTS", "PROJECTIONS", "ExpertLayout", "ExpertWeight", "MoeLayer", "describe_experts"),
    "gguf_lora": ("SUPPORTED_ARCHITECTURES", "GgufBase", "GgufTarget", "gguf_factors", "gguf_target", "scale_fold"),
    "init": ("default_factors", "dora_magnitude", "embedding_factors", "gaussian_factors", "olora_factors",
             "pissa_factors"),
    "modules": ("ADDITIVE_KINDS", "ModuleUpdate", "ia3_fits", "plan_module"),
    "peft_config": ("SUPPORTED_PEFT_TYPES", "AdapterSettings", "match_pattern", "uniform_scaling"),
    "peft_keys": ("ADAPTER_PARTS", "PEFT_PREFIX", "LoraKeys", "full_tensor_name", "lora_keys", "module_order",
                  "split_adapter_key"),
})
