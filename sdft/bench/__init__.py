"""Benchmarks and checks of sdft, as library code; `scripts/bench_*.py`, `scripts/check_losses_gpu.py` and
`scripts/gpu_check.py` only parse their arguments and call these modules.

    measure        timing (CUDA events or the host clock), peak device memory, resident memory on a CPU
    budget         per-part time budgets: what does not fit is skipped and says so
    synthetic      an in-process chat tokenizer and randomly initialized Qwen2-shaped models
    loss_accuracy  fused losses against float64 truth, beside naive PyTorch on low-precision logits
    loss_speed     time, extra memory and matmul-floor fraction of the loss paths
    liger          Liger-Kernel's fused linear JSD loss as a comparison path (optional)
    goals          the loss benchmark's goals, checked against measured rows
    cpu_losses     reference vs chunked losses on a CPU, each case in a fresh process
    settings       the one place where benchmark settings become config overrides
    step_columns   one trainer per column: the SDFT step, the SFT step
    trl_column     TRL's SDFTTrainer as a column (optional)
    step_report    medians, ratios and markdown tables of step benchmarks
    step_bench     SDFT vs SFT vs TRL steps on a CPU, in lockstep worker processes
    step_compare   SDFT vs SFT steps on the same tokens on one device, one column after the other
    gpu_check      the prepared GPU check: accuracy, loss benchmark and training steps, with results files

Nothing here imports kernel modules: the loss paths are chosen through `impl=` of `sdft.losses`.
"""
