"""The package's imports point only down its layers (docs/architecture.md)."""

import ast
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1] / "quee_jax"
# In the order data flows: a module may import its own layer and the ones before it.
LAYERS = ("core", "data", "models", "train", "collect", "gating", "protocol", "runtime",
          "pipeline", "examples")


def layer_of(module: str) -> int:
  """Layer index of a dotted module name under quee_jax."""
  parts = module.split(".")
  if parts[0] != "quee_jax" or len(parts) < 2 or parts[1] not in LAYERS:
    raise ValueError(f"module: {module!r} is in no layer of {LAYERS}")
  return LAYERS.index(parts[1])


def imported_modules(path: pathlib.Path) -> list[str]:
  """The quee_jax modules a file imports (from-imports of a package count as its submodules)."""
  out = []
  for node in ast.walk(ast.parse(path.read_text())):
    if isinstance(node, ast.Import):
      out += [a.name for a in node.names if a.name.startswith("quee_jax.")]
    elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("quee_jax"):
      if node.module == "quee_jax":
        out += [f"quee_jax.{a.name}" for a in node.names]
      else:
        out.append(node.module)
  return out


def modules():
  for path in sorted(ROOT.rglob("*.py")):
    rel = path.relative_to(ROOT.parent).with_suffix("")
    name = ".".join(rel.parts)
    if name != "quee_jax.__init__":  # the package's face re-exports every layer
      yield name.removesuffix(".__init__"), path


@pytest.mark.parametrize("name,path", list(modules()), ids=lambda x: str(x).split("/")[-1])
def test_imports_point_down(name, path):
  own = layer_of(name)
  up = [m for m in imported_modules(path) if layer_of(m) > own]
  assert not up, f"{name} ({LAYERS[own]}) imports later layers: {up}"


def test_every_module_has_a_layer():
  assert {layer_of(name) for name, _ in modules()} == set(range(len(LAYERS)))
