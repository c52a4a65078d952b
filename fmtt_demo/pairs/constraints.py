"""Constraints on the pair (a, b) = (left digit, right digit), and the rewards built from them.

A constraint is a set A of ordered pairs, written as an expression in a and b ("a + b == 10",
"a == b", "a == 3 and b == 8", "a - b >= 5") or by a preset name. Its reward is the log-probability,
under the reward classifier applied to each half, that the canvas shows a pair in A:

    r(x) = log sum_{(a, b) in A} p(a | left(x)) p(b | right(x))

differentiable in the pixels. With reward scale 1 the tilted law p(x) exp(r(x)) is the base law
conditioned on A (Bayes); larger scales sharpen it. The judge scores the same set with its own calls.
"""
from __future__ import annotations

import ast
import operator

import torch
import torch.nn.functional as F

from .data import halves

PRESETS = {
    "sum10": "a + b == 10",
    "same": "a == b",
    "pair38": "a == 3 and b == 8",
    "left_larger5": "a - b >= 5",
}

_BINARY = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.FloorDiv: operator.floordiv,
           ast.Mod: operator.mod}
_COMPARE = {ast.Eq: operator.eq, ast.NotEq: operator.ne, ast.Lt: operator.lt, ast.LtE: operator.le,
            ast.Gt: operator.gt, ast.GtE: operator.ge}
HELP = ("a preset (" + ", ".join(f"{k}: {v}" for k, v in PRESETS.items()) + ") or an expression in a (left "
        "digit) and b (right digit) with integers, + - * // %, comparisons, and / or / not")


def _evaluate(node, a: int, b: int):
    """The expression's value at one pair: a small interpreter, so no Python code is ever run."""
    if isinstance(node, ast.Expression):
        return _evaluate(node.body, a, b)
    if isinstance(node, ast.Name) and node.id in ("a", "b"):
        return a if node.id == "a" else b
    if isinstance(node, ast.Constant) and isinstance(node.value, int) and not isinstance(node.value, bool):
        return node.value
    if isinstance(node, ast.BinOp) and type(node.op) in _BINARY:
        return _BINARY[type(node.op)](_evaluate(node.left, a, b), _evaluate(node.right, a, b))
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.Not)):
        value = _evaluate(node.operand, a, b)
        return -value if isinstance(node.op, ast.USub) else not value
    if isinstance(node, ast.BoolOp):
        values = [bool(_evaluate(v, a, b)) for v in node.values]
        return all(values) if isinstance(node.op, ast.And) else any(values)
    if isinstance(node, ast.Compare):
        left = _evaluate(node.left, a, b)
        for op, right_node in zip(node.ops, node.comparators):
            if type(op) not in _COMPARE:
                break
            right = _evaluate(right_node, a, b)
            if not _COMPARE[type(op)](left, right):
                return False
            left = right
        else:
            return True
    raise ValueError(f"unsupported part {ast.unparse(node)!r}")


def constraint_table(spec: str) -> torch.Tensor:
    """The constraint as a [10, 10] boolean table, table[a, b] = (a, b) satisfies it."""
    text = PRESETS.get(spec.strip(), spec)
    try:
        tree = ast.parse(text, mode="eval")
        table = torch.tensor([[bool(_evaluate(tree, a, b)) for b in range(10)] for a in range(10)])
    except (SyntaxError, ValueError, ZeroDivisionError) as e:
        raise ValueError(f"constraint {spec!r} is not understood ({e}); give {HELP}.") from None
    if not table.any():
        raise ValueError(f"constraint {spec!r} holds for no pair of digits 0..9; it would have no reward to steer "
                         "toward. Check the expression (a is the left digit, b the right).")
    return table


class PairConstraintReward:
    """r(x) = log P_classifier((left, right) in A | x), [B] for canvases [B, 1, 8, 16]."""

    def __init__(self, classifier, spec: str):
        self.classifier, self.spec = classifier, spec
        self.expression = PRESETS.get(spec.strip(), spec)
        self.table = constraint_table(spec)
        self._log_mask = torch.where(self.table, 0.0, float("-inf"))

    def side_log_probs(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        left, right = halves(x)
        log_p = F.log_softmax(self.classifier(torch.cat([left, right])), dim=1)
        return log_p[: x.shape[0]], log_p[x.shape[0]:]

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        log_left, log_right = self.side_log_probs(x)
        joint = log_left[:, :, None] + log_right[:, None, :] + self._log_mask.to(x)
        return torch.logsumexp(joint.flatten(1), dim=1)

    def base_rate(self) -> float:
        """The fraction of the 100 ordered pairs in A: the success rate of uniform, independent digits."""
        return int(self.table.sum()) / self.table.numel()

    def __str__(self):
        return f"log P({self.expression} | x)"


@torch.no_grad()
def judge_calls(judge, x: torch.Tensor) -> torch.Tensor:
    """The judge's (left, right) digits, [B, 2]."""
    left, right = halves(x)
    calls = judge(torch.cat([left, right])).argmax(1)
    return torch.stack([calls[: x.shape[0]], calls[x.shape[0]:]], dim=1)


def judge_success(judge, table: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """[B] booleans: the judge reads a pair that satisfies the constraint."""
    calls = judge_calls(judge, x)
    return table.to(x.device)[calls[:, 0], calls[:, 1]]
