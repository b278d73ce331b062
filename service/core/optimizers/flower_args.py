"""What Flower's server strategies share as optimizers: their argument names as aliases.

optserve names a group's step size ``lr`` everywhere (schedules rewrite ``lr``, the session
document reports ``lr`` per group), while Flower calls the server learning rate ``eta``
(FedOpt family) or ``server_learning_rate`` (FedAvgM). A strategy accepts Flower's names
as aliases of its own, so a Flower config can be pasted as is.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar, TypeVar

from service.core.errors import InvalidHyperparameter
from service.core.optimizers.base import Optimizer

S = TypeVar("S")


def rename_aliases(
    given: Mapping[str, Any], aliases: Mapping[str, str], where: str = ""
) -> dict[str, Any]:
    """``given`` with every alias renamed to its canonical name; both at once is an error."""
    out = dict(given)
    for alias, name in aliases.items():
        if alias not in out:
            continue
        if name in out:
            raise InvalidHyperparameter(
                f"{where}{alias}",
                f"{where}{alias} is another name for {where}{name}; give only one of them",
                out[alias],
            )
        out[name] = out.pop(alias)
    return out


class FlowerStrategy(Optimizer[S]):
    """A Flower server strategy as an optimizer of the pseudo-gradient.

    The pseudo-gradient of a round is ``current - weighted_average(client params)`` (the
    negative of Flower's ``delta_t``), so that "descending" it moves the global model
    towards the clients, exactly as Flower's FedAvgM comment puts it: updates are the
    opposite of gradients.
    """

    aliases: ClassVar[Mapping[str, str]] = {}
    """Flower's argument name -> optserve's."""
    unsupported = ()
    """Flower's strategies take none of torch's device arguments."""

    def resolve(self, given: Mapping[str, Any], where: str = "") -> dict[str, Any]:
        return super().resolve(rename_aliases(given, self.aliases, where), where)

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "aliases": dict(self.aliases), "family": "flower"}
