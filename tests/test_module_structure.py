"""fastmoe.module_structure: a module tree walked once, walked again after anything is registered on it."""

import torch

from fastmoe.module_structure import structure_of


def test_a_walk_is_kept_until_a_module_parameter_or_buffer_is_registered():
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Sequential(torch.nn.Linear(4, 2)))
    first = structure_of(model)
    assert structure_of(model) is first
    assert first.modules == tuple(model.modules())
    assert first.named_parameters == tuple(model.named_parameters())

    model[0].weight.requires_grad_(False)  # values are read from the kept objects: no new walk
    assert structure_of(model) is first

    model[1].append(torch.nn.ReLU())  # a module registered deep inside
    assert structure_of(model).modules == tuple(model.modules()) != first.modules

    model[0].weight = torch.nn.Parameter(torch.zeros(4, 3))  # a parameter replaced
    assert structure_of(model).named_parameters == tuple(model.named_parameters())
    assert structure_of(model).named_parameters[0][1] is model[0].weight

    model[0].register_buffer("scale", torch.ones(1))
    assert structure_of(model).buffers == tuple(model.buffers()) and len(structure_of(model).buffers) == 1


def test_temporary_containers_and_modules_being_built_keep_the_walk():
    """LFM2-MoE's forward slices its ModuleList of layers at every call (a new ModuleList registers the layers into
    itself): that changes no walked tree, and must not send every step into a new walk; neither does a module being
    built, until it is attached."""
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.ModuleList([torch.nn.Linear(4, 4) for _ in range(3)]))
    first = structure_of(model)
    assert len(model[1][:2]) == 2
    new = torch.nn.Sequential()
    new.add_module("extra", torch.nn.Linear(4, 4))
    assert structure_of(model) is first
    model[1].append(new)
    assert structure_of(model).modules == tuple(model.modules()) != first.modules


def test_a_walked_model_is_freed_with_its_last_reference():
    """The walk holds the model's modules: kept in a global table it would keep every model ever walked (and its
    GPU memory) alive. Kept on the module, it goes with the model."""
    import gc
    import weakref

    from fastmoe.graphed_checkpointing import _LayerParts

    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Dropout(0.1))
    structure_of(model)
    _LayerParts.of(model)
    gone = weakref.ref(model)
    del model
    gc.collect()
    assert gone() is None
