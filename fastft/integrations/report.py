"""PatchReport: what `fastft.patch` fused, what stayed unfused and why, and the LoRA input groups it formed."""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass, field

_SHOWN = 3  # module names shown per reason in the summary


def _natural(name: str) -> list:
    """Sort key putting layers.2 before layers.10."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]


def _layer_pattern(name: str) -> str:
    """A module name with its layer numbers replaced by '*' (layers.3.mlp.(gate_proj, up_proj) -> layers.*.mlp...)."""
    return re.sub(r"\.\d+\.", ".*.", name)


@dataclass
class PatchReport:
    """What `patch` fused (counts by kind), which modules stay on their library's forward (name -> reason) and the
    LoRA input groups (name -> "grouped", or why it stopped). `str(report)`: a summary of a few lines;
    `report.details()`: every module and group by name, layers in numeric order."""

    fused: Counter = field(default_factory=Counter)
    unfused: dict[str, str] = field(default_factory=dict)
    input_groups: dict[str, str] = field(default_factory=dict)

    def _header(self) -> list[str]:
        lines = [f"fastft.patch: fused {sum(self.fused.values())} module(s)"]
        lines += [f"  {kind}: {count}" for kind, count in sorted(self.fused.items())]
        return lines

    def __str__(self) -> str:
        lines = self._header()
        if self.input_groups:
            lines.append(f"LoRA input groups (one call for the siblings' rank-r terms): {len(self.input_groups)}")
            by_state: dict[str, list[str]] = {}
            for name, state in self.input_groups.items():
                by_state.setdefault(state, []).append(name)
            for state, names in sorted(by_state.items()):
                patterns = sorted({_layer_pattern(name) for name in names}, key=_natural)
                shown = ", ".join(patterns[:_SHOWN]) + (", ..." if len(patterns) > _SHOWN else "")
                lines.append(f"  {state}: {len(names)} ({shown})")
        if self.unfused:
            lines.append(f"left unfused: {len(self.unfused)}")
            by_reason: dict[str, list[str]] = {}
            for name, reason in self.unfused.items():
                by_reason.setdefault(reason, []).append(name)
            for reason, names in sorted(by_reason.items(), key=lambda item: -len(item[1])):
                names = sorted(names, key=_natural)
                shown = ", ".join(names[:_SHOWN]) + (f" and {len(names) - _SHOWN} more" if len(names) > _SHOWN else "")
                lines.append(f"  {len(names)} x {reason}: {shown}")
        if self.input_groups or self.unfused:
            lines.append("(report.details() lists every module)")
        return "\n".join(lines)

    def details(self) -> str:
        """Every input group and unfused module by name, layers in numeric order."""
        lines = self._header()
        if self.input_groups:
            lines.append(f"LoRA input groups (one call for the siblings' rank-r terms): {len(self.input_groups)}")
            lines += [f"  {name}: {self.input_groups[name]}" for name in sorted(self.input_groups, key=_natural)]
        if self.unfused:
            lines.append(f"left unfused: {len(self.unfused)}")
            lines += [f"  {name}: {self.unfused[name]}" for name in sorted(self.unfused, key=_natural)]
        return "\n".join(lines)

    def __repr__(self) -> str:
        stopped = sum(state != "grouped" for state in self.input_groups.values())
        return (f"PatchReport(fused={dict(sorted(self.fused.items()))}, unfused={len(self.unfused)}, "
                f"input_groups={len(self.input_groups)}{f' ({stopped} stopped)' if stopped else ''})")


__all__ = ["PatchReport"]
