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
            args = (node.args[:1] if name == "addItem" else list(node.args))   # addItem(text, data): data is no text
            args += [k.value for k in node.keywords if k.arg in ("windowTitle",)]
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


# -- publication ------------------------------------------------------------------------------------
def test_license_file_is_the_apache_license_pyproject_declares():
    text = (REPO / "LICENSE").read_text()
    assert "Apache License" in text and "Version 2.0, January 2004" in text
    assert "END OF TERMS AND CONDITIONS" in text
    try:
        import tomllib
    except ModuleNotFoundError:   # Python 3.10
        import pytest

        tomllib = pytest.importorskip("tomli")
    assert tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["license"] == "Apache-2.0"


def _module_constant(name: str):
    tree = ast.parse(MODULE_FILE.read_text())
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == name for t in node.targets):
            return ast.literal_eval(node.value)
    raise AssertionError(f"{name} is not a constant of the module file")


def test_extension_index_rules_repository_name_contributors_and_help_link():
    fields = _s4ext()
    entry = json.loads((REPO / "MedPrunerSlicer.json").read_text())
    # The Extensions Index checks that the repository name starts with "Slicer".
    for url in (fields["scmurl"], fields["homepage"], entry["scm_url"]):
        repository = url.rstrip("/").removesuffix(".git").rsplit("/", 1)[-1]
        assert repository.startswith("Slicer"), url
    # Contributors: "Name (Organisation)" entries, the same in the module, CMakeLists and .s4ext, no placeholder.
    contributors = _module_constant("CONTRIBUTORS")
    assert ", ".join(contributors) == fields["contributors"]
    for person in contributors:
        assert re.fullmatch(r"[^(),]+ \([^()]+\)", person), person
    assert "authors" not in fields["contributors"].lower()
    # The help links to the project's own documentation, a file of this repository (not a Slicer readthedocs page).
    text = MODULE_FILE.read_text()
    assert "getDefaultModuleDocumentationLink" not in text
    docs_url = _module_constant("DOCUMENTATION_URL")
    assert docs_url.startswith(fields["homepage"] + "/blob/main/")
    assert (REPO / docs_url.split("/blob/main/", 1)[1]).is_file()
    assert "RESEARCH_NOTICE" in text and "SUPPORTED_VERSIONS_TEXT" in text


def test_publication_checklist_is_in_the_slicer_docs():
    text = (REPO / "docs" / "SLICER.md").read_text()
    assert "Extensions Index" in text and "starts with \"Slicer\"" in text and "LICENSE" in text


# -- Slicer 5.8 (Python 3.9) loads the module and its library ----------------------------------------
_PY310_NAMES = {"pairwise", "TypeAlias", "ParamSpec", "Concatenate", "TypeGuard", "KW_ONLY", "Self", "TypeVarTuple",
                "Unpack", "aiter", "anext", "EllipsisType", "NoneType", "NotImplementedType", "UTC"}


def _files_slicer_loads():
    return [MODULE_FILE, *sorted(LIB.glob("*.py"))]


def test_files_slicer_loads_are_python_3_9():
    problems = []
    for path in _files_slicer_loads():
        source = path.read_text()
        try:
            tree = ast.parse(source, feature_version=(3, 9))   # match, parenthesised with, ... are refused
        except SyntaxError as exc:
            problems.append(f"{path.name}:{exc.lineno}: {exc.msg}")
            continue
        future = any(isinstance(n, ast.ImportFrom) and n.module == "__future__" and
                     any(a.name == "annotations" for a in n.names) for n in tree.body)
        annotated = any(isinstance(n, ast.AnnAssign) or (isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef)) and (
            n.returns is not None or any(a.annotation is not None for a in n.args.args))) for n in ast.walk(tree))
        if annotated and not future:
            problems.append(f"{path.name}: no 'from __future__ import annotations' (X | None annotations need 3.10)")
        for node in ast.walk(tree):
            if isinstance(node, (ast.Name, ast.Attribute)):
                name = node.id if isinstance(node, ast.Name) else node.attr
                if name in _PY310_NAMES:
                    problems.append(f"{path.name}:{node.lineno}: {name} is Python 3.10+")
            elif isinstance(node, ast.alias) and node.name in _PY310_NAMES:
                problems.append(f"{path.name}: imports {node.name} (Python 3.10+)")
            elif isinstance(node, ast.Call):
                func = node.func.id if isinstance(node.func, ast.Name) else getattr(node.func, "attr", "")
                keywords = {k.arg for k in node.keywords}
                if func == "zip" and "strict" in keywords:
                    problems.append(f"{path.name}:{node.lineno}: zip(strict=) is Python 3.10+")
                if func == "dataclass" and keywords & {"slots", "kw_only", "match_args"}:
                    problems.append(f"{path.name}:{node.lineno}: dataclass({keywords}) is Python 3.10+")
                if func == "isinstance" and any(isinstance(a, ast.BinOp) and isinstance(a.op, ast.BitOr)
                                                for a in node.args[1:]):
                    problems.append(f"{path.name}:{node.lineno}: isinstance(x, A | B) is Python 3.10+")
            elif isinstance(node, ast.Try) and hasattr(ast, "TryStar") and isinstance(node, ast.TryStar):
                problems.append(f"{path.name}:{node.lineno}: except* is Python 3.11+")
    assert not problems, "\n".join(problems)


def test_timeouts_are_caught_as_socket_timeout_too():
    """On Python 3.9 socket.timeout is not TimeoutError: wherever the client catches a timeout, it names both."""
    text = (LIB / "client.py").read_text()
    for match in re.finditer(r"except \(([^)]*)\)", text):
        names = match.group(1)
        if "TimeoutError" in names:
            assert "socket.timeout" in names, f"client.py catches TimeoutError without socket.timeout: {names}"


# -- the module file only uses what the library provides (the widget cannot run here) ---------------
def test_every_library_name_the_module_uses_exists():
    import importlib

    tree = ast.parse(MODULE_FILE.read_text())
    imported_modules = {}
    for node in tree.body:
        if isinstance(node, ast.ImportFrom) and node.module == "MedPrunerSlicerLib":
            for alias in node.names:
                imported_modules[alias.asname or alias.name] = importlib.import_module(f"MedPrunerSlicerLib.{alias.name}")
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("MedPrunerSlicerLib."):
            module = importlib.import_module(node.module)
            for alias in node.names:
                assert hasattr(module, alias.name), f"{node.module} has no {alias.name}"
    missing = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in imported_modules:
            if not hasattr(imported_modules[node.value.id], node.attr):
                missing.append(f"{node.value.id}.{node.attr} (line {node.lineno})")
    assert not missing, missing
    from MedPrunerSlicerLib.local_server import LocalServer

    for name in set(re.findall(r"self\.(?:logic\.)?localServer\.(\w+)", MODULE_FILE.read_text())):
        assert hasattr(LocalServer, name) or name in ("process", "log_path", "command", "log_dir"), name


# -- nothing slow on the main thread -----------------------------------------------------------------
# Calls that do network or package installs, and so must only run in a worker (a lambda or nested
# function handed to a JobRunner), never directly in a method a widget signal or timer calls.
_BLOCKING_CALLS = {"health", "check_token", "submit", "status", "result", "heatmap", "urlopen", "open_url",
                   "pip_install", "pip_ensure", "installTorch", "check_call", "check_output", "run_job",
                   "downloadAndInstallExtensionByName", "wait_until_ready",
                   # ending a leftover server or stopping ours waits seconds for the process tree
                   "prepare_port", "startLocalServer", "stopLocalServer", "end_process_tree", "stop_leftovers"}


def _methods_and_calls():
    """{"Class.method": (set of called names, set of self-method names called)}, lambdas and nested defs
    (the code handed to workers) left out."""
    tree = ast.parse(MODULE_FILE.read_text())
    table = {}

    class Calls(ast.NodeVisitor):
        def __init__(self):
            self.names, self.selfs = set(), set()

        def visit_Lambda(self, node):   # runs in the worker
            pass

        def visit_FunctionDef(self, node):   # nested: handed to a worker or a callback
            pass

        def visit_Call(self, node):
            func = node.func
            if isinstance(func, ast.Attribute):
                self.names.add(func.attr)
                if isinstance(func.value, ast.Name) and func.value.id == "self":
                    self.selfs.add(func.attr)
                if (isinstance(func.value, ast.Attribute) and isinstance(func.value.value, ast.Name)
                        and func.value.value.id == "self" and func.value.attr == "logic"):
                    self.selfs.add("logic." + func.attr)
            elif isinstance(func, ast.Name):
                self.names.add(func.id)
            self.generic_visit(node)

    for cls in [n for n in tree.body if isinstance(n, ast.ClassDef)]:
        for fn in [n for n in cls.body if isinstance(n, ast.FunctionDef)]:
            visitor = Calls()
            for statement in fn.body:
                visitor.visit(statement)
            table[f"{cls.name}.{fn.name}"] = (visitor.names, visitor.selfs)
    return table


def _reachable_blocking_calls(table, start: str) -> set[str]:
    seen, todo, found = set(), [start], set()
    while todo:
        key = todo.pop()
        if key in seen or key not in table:
            continue
        seen.add(key)
        names, selfs = table[key]
        found |= names & _BLOCKING_CALLS
        cls = key.split(".")[0]
        for callee in selfs:
            if callee.startswith("logic."):
                todo.append("MedPrunerSlicerLogic." + callee.split(".", 1)[1])
            else:
                todo.append(f"{cls}.{callee}")
    return found


def test_no_http_or_install_call_is_reachable_from_a_widget_slot_without_a_worker():
    table = _methods_and_calls()
    slots = [key for key in table if key.startswith("MedPrunerSlicerWidget.on") or key in (
        "MedPrunerSlicerWidget.setup", "MedPrunerSlicerWidget.enter")]
    assert len(slots) > 15, slots
    offenders = {slot: calls for slot in slots if (calls := _reachable_blocking_calls(table, slot))}
    assert not offenders, f"slots that reach network/install calls on the main thread: {offenders}"
    # and the check itself sees such a call when one is there
    table["MedPrunerSlicerLogic.startConnectionCheck"][0].add("check_token")
    assert _reachable_blocking_calls(table, "MedPrunerSlicerWidget.onTestConnection") == {"check_token"}
