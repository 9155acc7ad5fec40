"""The pooled decoding step: the step graph with its key/value cache kept on the device.

The step graph takes each image's cache (`past_key_values.*`, `[batch, heads, memory, head_dim]`) and
gives it back updated (`present.*`), so between steps the cache travels through the host. The pooled
graph takes instead one pool per cache tensor (`pool.*`, `[capacity, heads, memory, head_dim]`: every
image being generated, each in its slot) and the slots of this step's images (`slots` `[batch]`): it
gathers their rows, runs the step graph's own nodes on them, and scatters the updated rows back
(`pool_updated.*`). The service binds each pool as both input and output, so ScatterND writes the
rows in place (it copies its input only when the buffers differ): a step moves tokens in and logits
out, however many requests share it.

`python -m export.pooled model_repository/imagetransformer/1` adds the graph to an exported version
(no retraining): checked for identical results against the step graph, then written with its manifest.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper

from export.onnx_export import ExportError
from service.manifest import MANIFEST_FILE, GraphSpec, TensorSpec, read_manifest
from service.sampling import PAST, POOL, POOLED_GRAPH, PRESENT, SLOTS, UPDATED

SLOT_INDEX = "pool_index"  # slots as ScatterND's indices, [batch, 1]
POSITION = "position"  # the step graph's input: each image's position, [batch]


def _pool_of(value: onnx.ValueInfoProto, name: str) -> onnx.ValueInfoProto:
    """`value`'s type with its batch axis renamed "capacity"."""
    pool = copy.deepcopy(value)
    pool.name = name
    dim = pool.type.tensor_type.shape.dim[0]
    dim.Clear()
    dim.dim_param = "capacity"
    return pool


def names(values: Iterable[onnx.ValueInfoProto]) -> list[str]:
    return [v.name for v in values]


def topological(nodes: list[onnx.NodeProto], known: set[str]) -> list[onnx.NodeProto]:
    """`nodes` with each after the nodes it reads from (a float16 conversion appends its casts)."""
    ordered: list[onnx.NodeProto] = []
    while nodes:
        ready = [n for n in nodes if all(not name or name in known for name in n.input)]
        if not ready:
            missing = sorted(set(nodes[0].input) - known)
            raise ExportError(f"the step graph's nodes read tensors nothing makes: {missing}")
        ordered += ready
        known.update(name for n in ready for name in n.output)
        placed = {id(n) for n in ready}
        nodes = [n for n in nodes if id(n) not in placed]
    return ordered


def pooled_step(step: onnx.ModelProto) -> onnx.ModelProto:
    """The pooled graph of a step graph that follows the naming above (any precision: the pools take
    the cache's own element type)."""
    model = copy.deepcopy(step)
    graph = model.graph
    past = [v for v in graph.input if v.name.startswith(PAST)]
    present = {v.name: v for v in graph.output if v.name.startswith(PRESENT)}
    suffixes = [v.name.removeprefix(PAST) for v in past]
    if not past or sorted(present) != sorted(PRESENT + s for s in suffixes) or POSITION not in names(graph.input):
        raise ExportError(f"a step graph needs {POSITION!r} and {PAST}* inputs matching its {PRESENT}* outputs")
    inputs = [v for v in graph.input if not v.name.startswith(PAST)]
    inputs.append(helper.make_tensor_value_info(SLOTS, TensorProto.INT64, ["batch"]))
    inputs += [_pool_of(v, POOL + s) for v, s in zip(past, suffixes, strict=True)]
    outputs = [v for v in graph.output if not v.name.startswith(PRESENT)]
    outputs += [_pool_of(present[PRESENT + s], UPDATED + s) for s in suffixes]
    rank = len(past[0].type.tensor_type.shape.dim)
    element = past[0].type.tensor_type.elem_type
    position_type = next(v for v in graph.input if v.name == POSITION).type.tensor_type.elem_type
    graph.initializer.extend([
        helper.make_tensor("pool_last_axis", TensorProto.INT64, [1], [-1]),
        helper.make_tensor("pool_cache_axes", TensorProto.INT64, [rank - 1], list(range(1, rank))),
        helper.make_tensor("pool_zero_position", position_type, [], [0]),
        helper.make_tensor("pool_zero", element, [], [0]),
    ])  # fmt: skip
    gather = [
        helper.make_node("Unsqueeze", [SLOTS, "pool_last_axis"], [SLOT_INDEX], name="pool/index"),
        # an image at position 0 starts from an empty cache, whatever its slot held before
        helper.make_node("Equal", [POSITION, "pool_zero_position"], ["pool_first"], name="pool/first"),
        helper.make_node("Unsqueeze", ["pool_first", "pool_cache_axes"], ["pool_fresh"], name="pool/fresh"),
    ]
    for s in suffixes:
        gather += [
            helper.make_node("Gather", [POOL + s, SLOTS], [f"pool_rows.{s}"], axis=0, name=f"pool/gather/{s}"),
            helper.make_node(
                "Where", ["pool_fresh", "pool_zero", f"pool_rows.{s}"], [PAST + s], name=f"pool/reset/{s}"
            ),
        ]
    scatter = [helper.make_node("ScatterND", [POOL + s, SLOT_INDEX, PRESENT + s], [UPDATED + s],
                                name=f"pool/scatter/{s}") for s in suffixes]  # fmt: skip
    known = {*names(inputs), *(t.name for t in graph.initializer)}
    nodes = topological([*gather, *graph.node, *scatter], known)
    for field, values in ((graph.node, nodes), (graph.input, inputs), (graph.output, outputs)):
        del field[:]
        field.extend(values)
    onnx.checker.check_model(model, full_check=True)  # types and shapes too
    return model


def pooled_spec(step: GraphSpec, file: str = f"{POOLED_GRAPH}.onnx") -> GraphSpec:
    """The manifest's entry for the pooled graph of `step`."""
    pool = lambda t, name: TensorSpec(name=name, dtype=t.dtype, shape=["capacity", *t.shape[1:]])  # noqa: E731
    past = [t for t in step.inputs if t.name.startswith(PAST)]
    return GraphSpec(
        file=file,
        inputs=[
            *(t for t in step.inputs if not t.name.startswith(PAST)),
            TensorSpec(name=SLOTS, dtype="int64", shape=["batch"]),
            *(pool(t, POOL + t.name.removeprefix(PAST)) for t in past),
        ],
        outputs=[
            *(t for t in step.outputs if not t.name.startswith(PRESENT)),
            *(pool(t, UPDATED + t.name.removeprefix(PRESENT)) for t in step.outputs if t.name.startswith(PRESENT)),
        ],
    )


def check_pooled(step: Path, pooled: Path, spec: GraphSpec, seed: int = 0) -> None:
    """The pooled graph gives the step graph's logits, and writes its updated cache into exactly the
    slots stepped (each pool bound as input and output, as the service runs it); ExportError if not."""
    rng = np.random.default_rng(seed)
    step_session, pooled_session = (ort.InferenceSession(str(p), providers=["CPUExecutionProvider"])
                                    for p in (step, pooled))  # fmt: skip
    capacity, slots = 9, np.array([7, 0, 4], dtype=np.int64)
    tokens = {t.name: _ints(t, rng, len(slots)) for t in spec.inputs if t.shape == ["batch"] and t.name != SLOTS}
    tokens[POSITION][0] = 0  # a new image: its slot's old rows must not count
    past = [t for t in spec.inputs if t.name.startswith(POOL)]
    pools = [rng.standard_normal((capacity, *t.shape[1:])).astype(t.dtype) for t in past]
    fresh = (tokens[POSITION] == 0)[:, None, None, None]
    gathered = {PAST + t.name.removeprefix(POOL): np.where(fresh, 0, p[slots]).astype(t.dtype)
                for t, p in zip(past, pools, strict=True)}  # fmt: skip
    expected = step_session.run(None, {**tokens, **gathered})
    values = [ort.OrtValue.ortvalue_from_numpy(p.copy()) for p in pools]
    binding = pooled_session.io_binding()
    for name, array in {**tokens, SLOTS: slots}.items():
        binding.bind_cpu_input(name, array)
    first = [o.name for o in pooled_session.get_outputs() if not o.name.startswith(UPDATED)]
    for name in first:
        binding.bind_output(name)
    for t, value in zip(past, values, strict=True):
        binding.bind_ortvalue_input(t.name, value)
        binding.bind_ortvalue_output(UPDATED + t.name.removeprefix(POOL), value)
    pooled_session.run_with_iobinding(binding)
    got = [v.numpy() for v in binding.get_outputs()[: len(first)]]
    for i, (pool, value) in enumerate(zip(pools, values, strict=True)):
        pool[slots] = expected[len(first) + i]
        got.append(value.numpy())
    if any(not np.array_equal(a, b) for a, b in zip(got, [*expected[: len(first)], *pools], strict=True)):
        raise ExportError(f"{pooled.name} does not compute what {step.name} does")


def _ints(spec: TensorSpec, rng: np.random.Generator, batch: int) -> np.ndarray:
    low, high = spec.range or (0, 9)
    return rng.integers(int(low), int(high) + 1, batch).astype(spec.dtype)


def write_pooled(step: GraphSpec, folder: Path) -> GraphSpec:
    """Write the pooled graph of the step graph in `folder` beside it, checked; its manifest entry."""
    spec = pooled_spec(step)
    staged = folder / f".{spec.file}.new"  # the graph in place only once it passed: a failure leaves the old one
    try:
        onnx.save(pooled_step(onnx.load(folder / step.file)), staged)
        check_pooled(folder / step.file, staged, spec)
        staged.replace(folder / spec.file)
    except ExportError:
        raise
    except Exception as exc:  # the checker's or ONNX Runtime's refusal
        raise ExportError(f"the pooled graph of {step.file} does not work: {str(exc)[:500]}") from exc
    finally:
        staged.unlink(missing_ok=True)
    return spec


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("version", type=Path, help="a version folder, e.g. model_repository/imagetransformer/1")
    args = parser.parse_args(argv)
    manifest = read_manifest(args.version)
    if "step" not in manifest.graphs:
        print(f"{args.version}: no step graph to pool", file=sys.stderr)
        return 2
    try:
        spec = write_pooled(manifest.graphs["step"], args.version)
    except ExportError as exc:
        print(f"{args.version}: {exc}", file=sys.stderr)
        return 2
    path = args.version / MANIFEST_FILE  # edited as JSON, so the rest of the file stays as it was written
    raw = json.loads(path.read_text())
    raw["graphs"][POOLED_GRAPH] = spec.model_dump(mode="json", exclude_none=True)
    path.write_text(json.dumps(raw, indent=2) + "\n")
    read_manifest(args.version)
    print(f"{args.version}: {POOLED_GRAPH} written and checked against the step graph")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
