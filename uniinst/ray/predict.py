"""``uniinst predict --ray``: a Ray Data job over a collection of images, a pool of model
replicas predicting and the driver writing each finished chunk to the output as it comes
(uniinst.engine.batch_prediction: the same records, parts, resume and summary as the
one-process job)."""

from __future__ import annotations

import io
import json
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pyarrow as pa
import ray
import torch

from uniinst.engine.batch_prediction import Destination, Outcome, PredictionRun, predict_file
from uniinst.engine.checkpoint import read_checkpoint
from uniinst.engine.exported_model import ExportedModel
from uniinst.engine.inference_model import inference_model, load_model_for_inference
from uniinst.ray.data import ensure_ray

_OUTCOME_SCHEMA = pa.schema([("file", pa.string()), ("line", pa.string()), ("png", pa.binary())])


class ImagePredictor:
    """One model replica: builds its model once from the file's bytes (a checkpoint or an
    exported program), then turns batches of image names into outcomes."""

    def __init__(
        self, *, model_file: list[ray.ObjectRef], name: str, backend: str, overrides: Sequence[str],
        class_names: list[str] | None, endpoint_url: str | None, draw_thresh: float | None, use_gpu: bool,
    ) -> None:
        # The file travels through the object store (in a list so that Ray does not resolve it
        # early): replicas on any node need no shared filesystem.
        data = ray.get(model_file[0])
        if backend == "eager":
            device = torch.device("cuda" if use_gpu and torch.cuda.is_available() else "cpu")
            state = read_checkpoint(io.BytesIO(data), name, map_location=device)
            self.model: Any = inference_model(state, source=name, device=device, overrides=overrides)
        else:
            self._dir = tempfile.TemporaryDirectory()
            path = Path(self._dir.name) / Path(name).name
            path.write_bytes(data)
            self.model = ExportedModel(path, backend=backend)
        if class_names:
            self.model.class_names = class_names
        self.endpoint_url, self.draw_thresh = endpoint_url, draw_thresh

    def __call__(self, batch: pa.Table) -> pa.Table:
        rows = []
        for file in batch.column("file").to_pylist():
            outcome = predict_file(self.model, file, endpoint_url=self.endpoint_url, draw_thresh=self.draw_thresh)
            rows.append({"file": file, "line": json.dumps(outcome.line()), "png": outcome.png or b""})
        return pa.Table.from_pylist(rows, schema=_OUTCOME_SCHEMA)


def predict_images_ray(
    model_file: str,
    files: Sequence[str],
    dest: Destination,
    *,
    backend: str = "eager",
    replicas: int = 1,
    draw_thresh: float | None = None,
    endpoint_url: str | None = None,
    class_names: list[str] | None = None,
    overrides: Sequence[str] = (),
    chunk: int = 8,
) -> dict[str, Any]:
    """Predict ``files`` with ``replicas`` replicas of ``model_file`` (a checkpoint, or with
    ``backend`` onnx/torchscript an exported file; a GPU each where the cluster has them and
    the backend is eager) into ``dest``, resuming what it holds; returns the summary."""
    if replicas < 1:
        raise ValueError(f"--replicas must be >= 1, got {replicas}")
    # Built once here, so that a file or override that does not fit fails in one line before
    # any task starts.
    if backend == "eager":
        load_model_for_inference(model_file, device=torch.device("cpu"), overrides=overrides)
    else:
        ExportedModel(model_file, backend=backend)
    data = Path(model_file).read_bytes()
    ensure_ray()
    run = PredictionRun.open(dest)
    todo = run.todo(files)
    if todo:
        use_gpu = backend == "eager" and ray.cluster_resources().get("GPU", 0) >= 1
        ds = ray.data.from_items([{"file": f} for f in todo], override_num_blocks=max(1, -(-len(todo) // chunk)))
        ds.context.execution_options.preserve_order = False
        outcomes = ds.map_batches(
            ImagePredictor,
            fn_constructor_kwargs={
                "model_file": [ray.put(data)], "name": model_file, "backend": backend, "overrides": list(overrides),
                "class_names": class_names, "endpoint_url": endpoint_url, "draw_thresh": draw_thresh,
                "use_gpu": use_gpu,
            },
            batch_size=chunk, batch_format="pyarrow", concurrency=replicas, num_gpus=1 if use_gpu else 0,
        )
        for block in outcomes.iter_batches(batch_size=None, batch_format="pyarrow"):
            rows = block.to_pylist()
            run.add([Outcome.from_line(r["file"], r["line"], png=r["png"]) for r in rows], total=len(files))
    return run.finish(files)

