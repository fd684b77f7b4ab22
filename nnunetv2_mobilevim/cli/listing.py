"""``nnunetv2_mobilevim list``: every trainer the package ships, with its paper, network, parameters for
a plan (2D and 3D), and recipe; and the network of any of them for ``summary --network``.

The plans: a dataset's own (``-d DATASET [-p PLANS]``, from nnUNet_preprocessed) or, without one, the
example plans shipped in ``nnunet/example_plans.json`` (how they were built is written in the file).
Networks are built on PyTorch's meta device: shapes and parameter counts without memory or time.
"""

from __future__ import annotations

import json
from contextlib import contextmanager
from importlib import resources
from typing import Dict, List, Optional, Tuple

import torch
from torch import nn

NNUNET_PAPER = "nnU-Net (Isensee et al. 2021)"
NNUNET_RECIPE = "nnU-Net's: SGD (Nesterov 0.99) + poly, 1000 epochs"

Plan = Tuple[object, int, int, str]  # (ConfigurationManager, input channels, output channels, where from)


def shipped_trainers() -> List[type]:
    """The trainers nnU-Net finds through ``nnUNet_extTrainer`` (the shim module's), by network: MobileViM,
    U-Mamba, Taming Mambas, then nnU-Net's own network."""
    from ..ext_trainers import nnunetv2_mobilevim_trainers as shim

    modules = ["trainers", "umamba_trainers", "taming_trainers", "device_augmentation", "nnunet_network_trainers"]
    found = [v for k, v in vars(shim).items() if k.startswith("nnUNetTrainer") and isinstance(v, type)]
    return sorted(found, key=lambda t: (modules.index(t.__module__.rsplit(".", 1)[1]), t.__name__))


def example_plans() -> Dict[str, Plan]:
    """The shipped example configurations by name ("3d_fullres", "2d")."""
    from nnunetv2.utilities.plans_handling.plans_handler import ConfigurationManager

    data = json.loads(resources.files("nnunetv2_mobilevim.nnunet").joinpath("example_plans.json").read_text())
    return {name: (ConfigurationManager(c["configuration"]), c["input_channels"], c["num_classes"], c["source"])
            for name, c in data["configurations"].items()}


def dataset_plans(dataset: str, plans: str = "nnUNetPlans") -> Dict[str, Plan]:
    """Every configuration of a preprocessed dataset's plans, with its channel and class counts."""
    from batchgenerators.utilities.file_and_folder_operations import isfile, join, load_json
    from nnunetv2.paths import nnUNet_preprocessed
    from nnunetv2.utilities.dataset_name_id_conversion import maybe_convert_to_dataset_name
    from nnunetv2.utilities.label_handling.label_handling import determine_num_input_channels
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    if nnUNet_preprocessed is None:
        raise ValueError("nnUNet_preprocessed is not set: export it, or leave out -d to use the example plans")
    name = maybe_convert_to_dataset_name(dataset)
    plans_file = join(nnUNet_preprocessed, name, plans + ".json")
    if not isfile(plans_file):
        raise ValueError(f"{plans_file} does not exist: run nnUNetv2_plan_and_preprocess -d {dataset} first")
    manager = PlansManager(plans_file)
    dataset_json = load_json(join(nnUNet_preprocessed, name, "dataset.json"))
    label_manager = manager.get_label_manager(dataset_json)
    out = {}
    for configuration in manager.available_configurations:
        cm = manager.get_configuration(configuration)
        out[configuration] = (cm, determine_num_input_channels(manager, cm, dataset_json),
                              label_manager.num_segmentation_heads, f"{name} {plans}")
    return out


@contextmanager
def initialisers_skipped():
    """``torch.nn.init``'s in-place initialisers as no-ops, for networks built on the meta device: there
    they only cost time (PyTorch runs them as reference decompositions, op by op). Our own: PyTorch's
    ``skip_init`` takes one module class with a ``device`` argument, not a whole network's builder
    (transformers' ``no_init_weights`` does the same as this, for its models)."""
    names = [n for n in dir(nn.init) if n.endswith("_") and not n.startswith("_") and callable(getattr(nn.init, n))]
    saved = {n: getattr(nn.init, n) for n in names}
    for n in names:
        setattr(nn.init, n, lambda tensor, *args, **kwargs: tensor)
    try:
        yield
    finally:
        for n, fn in saved.items():
            setattr(nn.init, n, fn)


def build_network(trainer: type, plan: Plan) -> nn.Module:
    """The training network (deep supervision on) that ``trainer`` builds for ``plan``, on the meta device."""
    from ..nnunet.base_trainer import nnUNetTrainerMambaBase

    cm, inputs, outputs, _ = plan
    with torch.device("meta"), initialisers_skipped():
        if issubclass(trainer, nnUNetTrainerMambaBase):
            return trainer.network_from_plan(cm, inputs, outputs, True)
        return trainer.build_network_architecture(None, cm, inputs, outputs, True)  # nnU-Net's reads no plans


def network_name(network: nn.Module) -> str:
    return getattr(getattr(network, "config", None), "name", type(network).__name__)


def describe(trainer: type, plans: Dict[str, Plan]) -> dict:
    """One row of ``list``: parameters per configuration, None where the trainer refuses it."""
    row = {"trainer": trainer.__name__, "paper": getattr(trainer, "paper", "") or NNUNET_PAPER,
           "recipe": getattr(trainer, "recipe", "") or NNUNET_RECIPE, "network": None, "params": {}}
    for configuration, plan in plans.items():
        try:
            network = build_network(trainer, plan)
        except (RuntimeError, ValueError) as err:  # e.g. a 3D-only network and a 2D plan
            row["params"][configuration] = None
            row.setdefault("refused", {})[configuration] = str(err).splitlines()[0]
            continue
        name = network_name(network)
        if getattr(trainer, "mamba", True) is False and not name.endswith("NoMamba"):
            name += "NoMamba"  # a twin: the same configuration with its Mamba layers left out
        row["network"] = row["network"] or name
        row["params"][configuration] = sum(p.numel() for p in network.parameters())
    return row


def format_rows(rows: List[dict], plans: Dict[str, Plan]) -> str:
    configurations = list(plans)
    lines = ["plans: " + "; ".join(f"{c}: {plans[c][3]}, patch {list(plans[c][0].patch_size)}, "
                                   f"{plans[c][1]} -> {plans[c][2]} channels" for c in configurations), ""]
    width = max(len(r["trainer"]) for r in rows)
    header = f"{'trainer':<{width}}  {'network':<22}" + "".join(f"{c + ' params':>18}" for c in configurations)
    lines += [header + "  paper; recipe", "-" * (len(header) + 16)]
    for r in rows:
        counts = "".join(f"{(format(r['params'][c] / 1e6, '.2f') + ' M') if r['params'][c] else 'no':>18}"
                         for c in configurations)
        lines.append(f"{r['trainer']:<{width}}  {str(r['network']):<22}{counts}  {r['paper']}; {r['recipe']}")
    return "\n".join(lines)


def run_list(dataset: Optional[str], plans: str, as_json: bool) -> int:
    chosen = dataset_plans(dataset, plans) if dataset else example_plans()
    rows = [describe(t, chosen) for t in shipped_trainers()]
    print(json.dumps(rows, indent=2) if as_json else format_rows(rows, chosen))
    return 0


def find_trainer(name: str) -> type:
    """A shipped trainer by its class name (as ``list`` prints it)."""
    trainers = shipped_trainers()
    for t in trainers:
        if t.__name__ == name:
            return t
    names = sorted(t.__name__ for t in trainers)
    raise ValueError(f"no shipped trainer is called {name!r}; `nnunetv2_mobilevim list` shows them: "
                     + ", ".join(names))


def summarize_network(trainer_name: str, configuration: str, dataset: Optional[str] = None,
                      plans: str = "nnUNetPlans") -> dict:
    """``summary --network``: the network a shipped trainer builds for a configuration, its parameters
    and deep-supervision output shapes (from a forward on the meta device)."""
    trainer = find_trainer(trainer_name)
    chosen = dataset_plans(dataset, plans) if dataset else example_plans()
    if configuration not in chosen:
        raise ValueError(f"no configuration {configuration!r} in {'the plans' if dataset else 'the example plans'}; "
                         f"choose one of {', '.join(chosen)}")
    plan = chosen[configuration]
    network = build_network(trainer, plan)
    cm, inputs, outputs, source = plan
    info = {"trainer": trainer.__name__, "network": network_name(network), "configuration": configuration,
            "plans": source, "patch": list(cm.patch_size), "in_channels": inputs, "classes": outputs,
            "params": sum(p.numel() for p in network.parameters())}
    try:
        with torch.no_grad():
            out = network(torch.empty(1, inputs, *cm.patch_size, device="meta"))
        info["output_shapes"] = [list(o.shape) for o in (out if isinstance(out, (list, tuple)) else [out])]
    except (RuntimeError, NotImplementedError) as err:  # an op without a meta implementation
        info["output_shapes"] = f"not computed ({type(err).__name__})"
    return info


def format_network_summary(info: dict) -> str:
    lines = [f"{info['network']}  ({info['trainer']}, {info['configuration']} of {info['plans']}, patch "
             f"{'x'.join(map(str, info['patch']))}, {info['in_channels']} -> {info['classes']} channels)",
             f"  parameters  {info['params']:>14,}  ({info['params'] / 1e6:.2f} M)"]
    if isinstance(info["output_shapes"], list):
        lines.append("  output shapes (deep supervision on, highest resolution first):")
        lines += [f"    {tuple(s)}" for s in info["output_shapes"]]
    return "\n".join(lines)
