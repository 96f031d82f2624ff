"""Structural checks of an ONNX graph that ``onnx.checker`` states unclearly or not at all.

Rules, applied to the main graph and to every subgraph (If branches, Loop and Scan bodies):
1. Every node input names a value that exists: a graph input, an initializer, the output of some node
   of the same graph, or a value of an enclosing graph (outer scope). Empty names are optional inputs.
2. The nodes form no cycle. A node holding subgraphs depends on the outer-scope values those
   subgraphs read, so a cycle through a subgraph is found too.
3. No value is produced twice in one graph (SSA).
Each failure is one ModelError naming the graph, the node and the value.
"""

from __future__ import annotations

from collections.abc import Iterable

import onnx

from ..errors import ModelError

__all__ = ["check_structure"]


def check_structure(model: onnx.ModelProto, where: str) -> None:
    _check_graph(model.graph, outer=frozenset(), where=where, label="main graph")


def _subgraphs(node: onnx.NodeProto) -> Iterable[tuple[str, onnx.GraphProto]]:
    for attr in node.attribute:
        if attr.type == onnx.AttributeProto.GRAPH:
            yield attr.name, attr.g
        elif attr.type == onnx.AttributeProto.GRAPHS:
            for i, g in enumerate(attr.graphs):
                yield f"{attr.name}[{i}]", g


def _node_label(node: onnx.NodeProto, index: int) -> str:
    name = f"{node.name!r} " if node.name else f"#{index} "
    domain = f"{node.domain}::" if node.domain not in ("", "ai.onnx") else ""
    return f"node {name}({domain}{node.op_type})"


def _free_names(graph: onnx.GraphProto) -> set[str]:
    """Names a subgraph reads from its enclosing scopes."""
    defined = {v.name for v in graph.input} | {t.name for t in graph.initializer}
    defined |= {s.values.name for s in graph.sparse_initializer}
    used: set[str] = set()
    for node in graph.node:
        defined.update(o for o in node.output if o)
        used.update(i for i in node.input if i)
        for _, sub in _subgraphs(node):
            used |= _free_names(sub)
    used.update(o.name for o in graph.output)
    return used - defined


def _check_graph(graph: onnx.GraphProto, outer: frozenset[str], where: str, label: str) -> None:
    local = {v.name for v in graph.input} | {t.name for t in graph.initializer}
    local |= {s.values.name for s in graph.sparse_initializer}
    producer: dict[str, int] = {}
    for index, node in enumerate(graph.node):
        for out in node.output:
            if not out:
                continue
            if out in producer or out in local:
                raise ModelError(
                    f"{label}: value {out!r} is produced twice (again by {_node_label(node, index)})",
                    where=where,
                    hint="each value must have exactly one producer; the model is malformed",
                )
            producer[out] = index
    known = local | producer.keys() | outer
    needs: list[set[int]] = []
    for index, node in enumerate(graph.node):
        direct = [i for i in node.input if i]
        inner = sorted({name for _, sub in _subgraphs(node) for name in _free_names(sub)})
        for name in direct + inner:
            if name not in known:
                role = "input {!r} of" if name in direct else "value {!r} read inside the subgraphs of"
                raise ModelError(
                    f"{label}: {role.format(name)} {_node_label(node, index)} is produced by no node and is neither "
                    "a graph input nor an initializer",
                    where=where,
                    hint="the model is incomplete or was cut badly; re-export it",
                )
        needs.append({producer[n] for n in direct + inner if n in producer})
    for out in graph.output:
        if out.name not in known:
            raise ModelError(
                f"{label}: output {out.name!r} is produced by no node and is not a graph input",
                where=where,
                hint="the model is incomplete or was cut badly; re-export it",
            )
    cycle = _find_cycle(needs)
    if cycle:
        path = " -> ".join(_node_label(graph.node[i], i) for i in cycle + cycle[:1])
        raise ModelError(
            f"{label}: the graph has a cycle: {path}",
            where=where,
            hint="ONNX graphs must be acyclic; loops belong in a Loop node's body",
        )
    scope = frozenset(known)
    for index, node in enumerate(graph.node):
        for attr_name, sub in _subgraphs(node):
            _check_graph(sub, scope, where, f"{label} > {_node_label(node, index)} attribute {attr_name!r}")


def _find_cycle(needs: list[set[int]]) -> list[int]:
    """Nodes on one dependency cycle, in order (empty if there is none). Iterative, so deep graphs are fine."""
    state = [0] * len(needs)  # 0 unseen, 1 on the current path, 2 done
    for start in range(len(needs)):
        if state[start]:
            continue
        path: list[int] = [start]
        iterators = [iter(sorted(needs[start]))]
        state[start] = 1
        while path:
            nxt = next(iterators[-1], None)
            if nxt is None:
                state[path.pop()] = 2
                iterators.pop()
            elif state[nxt] == 1:
                return path[path.index(nxt) :]
            elif state[nxt] == 0:
                state[nxt] = 1
                path.append(nxt)
                iterators.append(iter(sorted(needs[nxt])))
    return []
