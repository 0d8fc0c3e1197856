"""The repository's scripts (launch/*.py, configs/*.py) loaded as modules, so that tests call their functions and
`main()` in-process."""
import importlib.util
import pathlib
from types import ModuleType

REPO = pathlib.Path(__file__).resolve().parents[1]


def load_script(relative_path: str) -> ModuleType:
    """A fresh module from the file at `relative_path` under the repository root (e.g. 'launch/infer.py')."""
    path = REPO / relative_path
    spec = importlib.util.spec_from_file_location(f"{path.parent.name}_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
