"""The naive MLflow script the bench times `pipeline train` against: what a first try looks like.

One epoch of the seed model on the prepared file's train split: `mlflow.start_run`, a
synchronous `mlflow.log_metrics` of loss, accuracy and lr on every step, `mlflow.pytorch.
log_model` at the end, nothing overlapped or deferred. Prints the loop's seconds as the
last line of stdout, so the caller's wall time minus it is this script's fixed cost.

Usage: python bench/naive.py PREPARED_FILE  (tracking URI from MLFLOW_TRACKING_URI)
"""

import sys
import time

import mlflow
import mlflow.pytorch
import torch
from torch import nn

BATCH, LR = 128, 1e-3


def main(path: str) -> None:
    data = torch.load(path, weights_only=True)
    images = data["train_images"]
    images = images.unsqueeze(1) if images.dim() == 3 else images
    x = images.float().div(255).sub(0.5).div(0.5)
    y = data["train_labels"]
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 8, 3), nn.Flatten(), nn.Linear(8 * 26 * 26, 10))
    optimizer = torch.optim.Adam(model.parameters(), lr=LR)
    criterion = nn.CrossEntropyLoss()
    with mlflow.start_run():
        mlflow.log_params({"lr": LR, "batch_size": BATCH, "epochs": 1})
        start = time.perf_counter()
        order = torch.randperm(len(x))
        for step, i in enumerate(range(0, len(x), BATCH), 1):
            idx = order[i : i + BATCH]
            logits = model(x[idx])
            loss = criterion(logits, y[idx])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            accuracy = (logits.argmax(1) == y[idx]).float().mean().item()
            mlflow.log_metrics({"loss": loss.item(), "accuracy": accuracy, "lr": LR}, step=step)
        loop = time.perf_counter() - start
        mlflow.pytorch.log_model(model, name="model", input_example=x[:2].numpy())
    print(loop)


if __name__ == "__main__":
    main(sys.argv[1])
