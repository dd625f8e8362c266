"""A resolved plan applied to a loaded model in memory, and undone: previews and search trials.

The edits are sharded_ablate.py's own: the same resolution (lib/ablate/resolution.py) and the same
`project_out` on the same values, so the edited model in memory equals the written model loaded
back (tests check it for every family fixture). No copy of the model is made: only the originals
of the parameters an edit touches are kept, and written back by `undo`.

transformers does not always keep a checkpoint tensor under its own name: version 5 stacks routed
experts into one parameter and renames Mixtral's modules. `lib/ablate/architectures.py` lists those names
per family (`LoadedName`); a multimodal wrapper's text model may sit under another layout prefix.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import transformers
from transformers import PreTrainedModel

from lib.ablate.checkpoint import Checkpoint
from lib.ablate.projection import project_out
from lib.ablate.resolution import Resolution, TensorEdit
from lib.core.errors import UserError


@dataclass(frozen=True)
class LoadedTensor:
    """Where one checkpoint tensor lives in the loaded model: a parameter, or one expert of a stacked one."""

    parameter_name: str
    expert: int | None = None


class InMemoryEditor:
    """Applies resolutions to one loaded model and restores its parameters afterwards."""

    def __init__(self, model: PreTrainedModel, checkpoint: Checkpoint) -> None:
        self.model = model
        self.checkpoint = checkpoint
        self.parameters = dict(model.named_parameters(remove_duplicate=False))
        self.originals: dict[str, torch.Tensor] = {}
        self.untied_head = False

    def locate(self, tensor: str) -> LoadedTensor:
        """The loaded parameter that holds checkpoint tensor `tensor`; a UserError where none does."""
        for candidate in self._candidate_names(tensor):
            if candidate in self.parameters:
                return LoadedTensor(candidate)
        for loaded in self._stacked_or_renamed(tensor):
            if loaded.parameter_name in self.parameters:
                return loaded
        raise UserError(
            f"{tensor}: no parameter of the loaded {type(self.model).__name__} holds this checkpoint "
            f"tensor (transformers {transformers.__version__}); this plan cannot be applied in memory, "
            "write it with sharded_ablate.py instead"
        )

    def apply(self, resolution: Resolution) -> None:
        """Edit the model as sharded_ablate.py would edit the checkpoint."""
        located = [(edit, self.locate(edit.tensor)) for edit in resolution.edits]  # all found before any edit
        if resolution.untie_embeddings:
            self._untie_head()
        with torch.no_grad():
            for edit, loaded in located:
                self._edit(edit, loaded)

    def undo(self) -> None:
        """Put back every parameter an edit changed (and the embedding tie), bit for bit."""
        with torch.no_grad():
            for name, original in self.originals.items():
                self.parameters[name].data.copy_(original)
        self.originals.clear()
        if self.untied_head:
            self.model.get_output_embeddings().weight = self.model.get_input_embeddings().weight
            self.parameters = dict(self.model.named_parameters(remove_duplicate=False))
            self.untied_head = False

    def _edit(self, edit: TensorEdit, loaded: LoadedTensor) -> None:
        parameter = self.parameters[loaded.parameter_name]
        if not parameter.dtype.is_floating_point:
            raise UserError(
                f"{edit.tensor}: loaded as {parameter.dtype} (a quantised model?); in-memory edits "
                "need floating-point weights: load the model without --quant"
            )
        if loaded.parameter_name not in self.originals:
            self.originals[loaded.parameter_name] = parameter.detach().clone()
        values = parameter.data if loaded.expert is None else parameter.data[loaded.expert]
        project_out(values, edit.direction, edit.scale, edit.residual_axis, edit.norm_preserve, values.device)

    def _untie_head(self) -> None:
        """The embedding is edited and the head must keep the original: give the head its own copy."""
        head = self.model.get_output_embeddings()
        head.weight = torch.nn.Parameter(head.weight.detach().clone(), requires_grad=False)
        self.parameters = dict(self.model.named_parameters(remove_duplicate=False))
        self.untied_head = True

    def _candidate_names(self, tensor: str) -> Iterator[str]:
        """The name itself, then the same tensor under each other layout prefix of the family."""
        yield tensor
        own_prefix = self.checkpoint.layout.model_prefix
        if tensor.startswith(own_prefix):
            for layout in self.checkpoint.family.layouts:
                yield layout.model_prefix + tensor[len(own_prefix) :]

    def _stacked_or_renamed(self, tensor: str) -> Iterator[LoadedTensor]:
        for prefix in {layout.model_prefix for layout in self.checkpoint.family.layouts}:
            for loaded_name in self.checkpoint.family.loaded_names:
                pattern = rf"{re.escape(self.checkpoint.layout.model_prefix)}layers\.(?P<layer>\d+)\.{loaded_name.suffix}"
                matched = re.fullmatch(pattern, tensor)
                if matched:
                    expert = matched.groupdict().get("expert")
                    yield LoadedTensor(
                        f"{prefix}layers.{matched['layer']}.{loaded_name.parameter}",
                        None if expert is None else int(expert),
                    )


@contextmanager
def edited_in_memory(editor: InMemoryEditor, resolution: Resolution) -> Iterator[None]:
    """The model edited by `resolution` inside the block, restored after it (also on an error)."""
    try:
        editor.apply(resolution)
        yield
    finally:
        editor.undo()
