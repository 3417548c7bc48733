"""Several training processes: ``training.processes`` and ``training.distributed`` rendered as an
``accelerate launch`` config file and command line (no torch import: the orchestration env
renders them, the ML env runs them).

- ``ddp``: one replica of the model per process (NCCL on GPUs; gloo on a CPU, which the tests
  run with two processes);
- ``fsdp``: FSDP2 shards the frozen base model and the LoRA weights across the GPUs
  (transformer-block wrapping, full state dict gathered for the adapter file, CPU-RAM-efficient
  loading), for base models that do not fit one GPU;
- ``deepspeed``: ZeRO stage 3 (the deepspeed package must be in the training image).

Each process trains on its share of every optimizer step, so N processes with ``grad_accum`` A
take the steps one process takes with ``grad_accum`` N x A.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from collections.abc import Sequence

    from tuneloop.config import TrainingSettings


def accelerate_config(training: TrainingSettings, *, cpu: bool = False) -> dict[str, Any]:
    """The ``accelerate launch --config_file`` mapping for ``training`` on one machine."""
    config: dict[str, Any] = {
        "compute_environment": "LOCAL_MACHINE",
        "num_machines": 1,
        "machine_rank": 0,
        "num_processes": training.processes,
        # the Trainer sets bf16/fp16 from the dtype each process resolves (training.dtype: auto);
        # a value here would override a float32 choice through ACCELERATE_MIXED_PRECISION
        "mixed_precision": "no",
        "use_cpu": cpu,
        "rdzv_backend": "static",
        "same_network": True,
        "main_training_function": "main",
        "downcast_bf16": "no",
        # MULTI_GPU is accelerate's torchrun launcher; on a CPU its processes join with gloo
        # (MULTI_CPU would start one process, or need mpirun)
        "distributed_type": "MULTI_GPU",
    }
    if training.distributed == "ddp" or cpu:
        return config
    if training.distributed == "fsdp":
        config["distributed_type"] = "FSDP"
        config["fsdp_config"] = {
            "fsdp_version": 2,
            "fsdp_auto_wrap_policy": "TRANSFORMER_BASED_WRAP",
            "fsdp_reshard_after_forward": True,
            "fsdp_state_dict_type": "FULL_STATE_DICT",
            "fsdp_cpu_ram_efficient_loading": True,
            "fsdp_offload_params": False,
            "fsdp_activation_checkpointing": training.gradient_checkpointing,
        }
        return config
    config["distributed_type"] = "DEEPSPEED"
    config["deepspeed_config"] = {
        "zero_stage": 3,
        "zero3_init_flag": True,
        "zero3_save_16bit_model": True,
        "offload_optimizer_device": "none",
        "offload_param_device": "none",
        "gradient_accumulation_steps": training.grad_accum,
        "gradient_clipping": 1.0,
    }
    return config


def launch_command(python: str, config_file: str, args: Sequence[str]) -> list[str]:
    """``python -m accelerate.commands.launch --config_file F -m tuneloop.cli ARGS``."""
    return [python, "-m", "accelerate.commands.launch", "--config_file", config_file, "-m", "tuneloop.cli", *args]


def write_config(training: TrainingSettings, path: str, *, cpu: bool) -> None:
    """Write :func:`accelerate_config` as YAML (accelerate's own format)."""
    import yaml

    with open(path, "w", encoding="utf-8") as handle:
        yaml.safe_dump(accelerate_config(training, cpu=cpu), handle, sort_keys=True)
