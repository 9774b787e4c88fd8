"""Static checks of the Slicer extension: .ui, widget names, CMake lists, .s4ext, catalog entry, imports."""
from __future__ import annotations

import ast
import json
import re
import xml.etree.ElementTree as ET

from slicer_helpers import MODULE_DIR, REPO

MODULE_FILE = MODULE_DIR / "MedPrunerSlicer.py"
UI_FILE = MODULE_DIR / "Resources" / "UI" / "MedPrunerSlicer.ui"
LIB = MODULE_DIR / "MedPrunerSlicerLib"


def _ui_widgets() -> dict[str, ET.Element]:
    root = ET.parse(UI_FILE).getroot()
    return {w.get("name"): w for w in root.iter("widget")}


def test_ui_parses_and_every_widget_the_module_uses_exists():
    widgets = _ui_widgets()
    used = set(re.findall(r"self\.ui\.(\w+)", MODULE_FILE.read_text()))
    assert used, "the module uses no widgets?"
    assert used <= set(widgets), f"missing in the .ui: {sorted(used - set(widgets))}"


def test_ui_parameter_bindings_match_the_parameter_node():
    tree = ast.parse(MODULE_FILE.read_text())
    cls = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "MedPrunerSlicerParameterNode")
    fields = {n.target.id for n in cls.body if isinstance(n, ast.AnnAssign)}
    bound = {}
    for name, w in _ui_widgets().items():
        for prop in w.findall("property"):
            if prop.get("name") == "SlicerParameterName":
                bound[name] = prop.find("string").text
    assert bound and set(bound.values()) <= fields, (bound, fields)
    assert {"inputVolume", "question", "gamma", "tau", "pruningEnabled", "compare", "currentResult"} <= set(bound.values())


def _cmake_listed() -> set[str]:
    text = (MODULE_DIR / "CMakeLists.txt").read_text()
    return set(re.findall(r"^\s+([\w/.${}]+\.(?:py|ui|png))\s*$", text, flags=re.MULTILINE))


def test_every_python_file_and_resource_is_listed_in_the_module_cmakelists():
    listed = {p.replace("${MODULE_NAME}", "MedPrunerSlicer") for p in _cmake_listed()}
    expected = {"MedPrunerSlicer.py", "Resources/UI/MedPrunerSlicer.ui", "Resources/Icons/MedPrunerSlicer.png"}
    expected |= {str(p.relative_to(MODULE_DIR)) for p in LIB.glob("*.py")}
    expected |= {str(p.relative_to(MODULE_DIR)) for p in (MODULE_DIR / "medpruner").rglob("*.py")}
    assert expected - listed == set(), f"not listed in MedPrunerSlicer/CMakeLists.txt: {sorted(expected - listed)}"
    assert listed - expected == set(), f"listed but missing: {sorted(listed - expected)}"
    for path in listed:
        assert (MODULE_DIR / path).exists(), path
    # only the module file sits directly in the module path (every .py there is loaded as a module)
    assert [p.name for p in MODULE_DIR.glob("*.py")] == ["MedPrunerSlicer.py"]
    text = (MODULE_DIR / "CMakeLists.txt").read_text()
    assert "WITH_GENERIC_TESTS" in text and "slicer_add_python_unittest(SCRIPT ${MODULE_NAME}.py)" in text


def _s4ext() -> dict[str, str]:
    fields = {}
    for line in (REPO / "MedPrunerSlicer.s4ext").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            key, _, value = line.partition(" ")
            fields[key] = value.strip()
    return fields


def test_s4ext_has_every_field_and_matches_the_top_level_cmakelists():
    fields = _s4ext()
    required = ["scm", "scmurl", "scmrevision", "depends", "build_subdirectory", "homepage", "category", "iconurl",
                "screenshoturls", "contributors", "description", "enabled", "status"]
    for key in required:
        assert fields.get(key), f".s4ext field {key!r} is empty"
    top = (REPO / "CMakeLists.txt").read_text()
    assert "find_package(Slicer REQUIRED)" in top and "add_subdirectory(MedPrunerSlicer)" in top
    cmake = dict(re.findall(r'set\(EXTENSION_(\w+) "([^"]*)"\)', top))
    assert cmake["HOMEPAGE"] == fields["homepage"]
    assert cmake["CATEGORY"] == fields["category"]
    assert cmake["DESCRIPTION"] == fields["description"]
    assert cmake["ICONURL"] == fields["iconurl"]
    assert cmake["SCREENSHOTURLS"] == fields["screenshoturls"]
    assert cmake["CONTRIBUTORS"] == fields["contributors"]
    assert cmake["DEPENDS"] == fields["depends"] == "NA"   # PyTorch only for the local server, on demand
    for url in [fields["iconurl"], *fields["screenshoturls"].split()]:
        local = url.split("/main/", 1)[1]
        assert (REPO / local).exists(), f"{url} points at a file that is not in the repository"


def test_catalog_entry_parses_and_agrees_with_the_s4ext():
    entry = json.loads((REPO / "MedPrunerSlicer.json").read_text())
    fields = _s4ext()
    assert entry["$schema"].startswith("https://raw.githubusercontent.com/Slicer/Slicer/main/Schemas/")
    assert entry["category"] == fields["category"]
    assert entry["scm_url"].rstrip("/") == fields["scmurl"].removesuffix(".git")
    assert entry["scm_revision"] == fields["scmrevision"]
    assert entry["build_subdirectory"] == fields["build_subdirectory"]
    assert entry["build_dependencies"] == []


def test_scene_logic_imports_neither_qt_nor_the_engine():
    for path in [*LIB.glob("*.py")]:
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names = [node.module]
            for name in names:
                root = name.split(".")[0]
                assert root not in {"qt", "ctk", "PythonQt", "medpruner", "torch", "transformers", "SimpleITK"}, \
                    f"{path.name} imports {name}"
    top_level = [n for n in ast.parse(MODULE_FILE.read_text()).body if isinstance(n, (ast.Import, ast.ImportFrom))]
    assert not any(isinstance(n, ast.ImportFrom) and n.module and n.module.startswith("medpruner") for n in top_level)


def test_user_facing_strings_are_translatable():
    text = MODULE_FILE.read_text()
    assert "from slicer.i18n import tr as _" in text and "from slicer.i18n import translate" in text
    dialogs = {"errorDisplay", "confirmOkCancelDisplay", "confirmYesNoDisplay", "infoDisplay", "warningDisplay",
               "setText", "setInformativeText", "setWindowTitle", "addItem", "QCheckBox", "QLineEdit"}
    bare = []
    for node in ast.walk(ast.parse(text)):
        if isinstance(node, ast.Call):
            name = node.func.attr if isinstance(node.func, ast.Attribute) else getattr(node.func, "id", "")
            args = list(node.args) + [k.value for k in node.keywords if k.arg in ("windowTitle",)]
            if name in dialogs:
                bare += [a.value for a in args if isinstance(a, ast.Constant) and isinstance(a.value, str) and a.value]
        elif isinstance(node, ast.Assign) and any(isinstance(t, ast.Attribute) and t.attr in ("text", "toolTip")
                                                  for t in node.targets):
            if isinstance(node.value, ast.Constant) and isinstance(node.value.value, str) and node.value.value:
                bare.append(node.value.value)
    assert not bare, f"user-facing strings not wrapped in _(): {bare}"


def test_server_requirements_match_pyproject_and_limits_match_the_engine():
    from medpruner import volume_io
    from MedPrunerSlicerLib import local_server, volume_export

    try:
        import tomllib
    except ModuleNotFoundError:   # Python 3.10
        import pytest

        tomllib = pytest.importorskip("tomli")
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    wanted = set(project["dependencies"]) | set(project["optional-dependencies"]["server"])
    ours = set(local_server.ENGINE_REQUIREMENTS) | set(local_server.SLICER_BUNDLED) | {local_server.TORCH_REQUIREMENT}
    assert ours == wanted
    assert volume_export.MIN_AXIS_VOXELS == volume_io.MIN_AXIS_VOXELS
    assert volume_export.MAX_AXIS_VOXELS == volume_io.MAX_AXIS_VOXELS
    assert volume_export.MAX_TOTAL_VOXELS == volume_io.MAX_TOTAL_VOXELS


def test_labels_the_scene_logic_expects_are_the_engines():
    from medpruner.heatmaps import KEPT_LABELS

    assert sorted(KEPT_LABELS) == [0, 1, 2, 3, 4]
    assert KEPT_LABELS[0]["rgba"][3] == 0.0
