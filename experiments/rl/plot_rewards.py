"""Reward and KL curves of RL runs, from their train_metrics.jsonl, as one PNG.

python experiments/rl/plot_rewards.py OUT.png TITLE=MODEL_DIR [TITLE=MODEL_DIR ...]
"""

import pathlib
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from t5lite.train.metrics import read_metrics  # noqa: E402


def plot(output: str, runs: dict[str, str]) -> None:
    figure, axes = plt.subplots(2, len(runs), figsize=(5 * len(runs), 6), squeeze=False, sharex="col")
    for column, (title, model_dir) in enumerate(runs.items()):
        rows = read_metrics(pathlib.Path(model_dir) / "train_metrics.jsonl")
        steps = [row["step"] for row in rows]
        axes[0, column].plot(steps, [row["reward_mean"] for row in rows])
        axes[0, column].set(title=title, ylabel="mean reward")
        axes[1, column].plot(steps, [row["kl"] for row in rows], color="tab:red")
        axes[1, column].set(xlabel="step", ylabel="KL to the reference (nats per response)")
    figure.tight_layout()
    figure.savefig(output, dpi=100)
    print(f"Wrote {output}")


if __name__ == "__main__":
    plot(sys.argv[1], dict(arg.split("=", 1) for arg in sys.argv[2:]))
