"""A minimal PEP 517 / PEP 660 build backend, standard library only.

It packs the pure-Python package ``smolvm`` into a wheel (and the tree into
an sdist) so that ``pip install ./clients/python`` needs nothing from a
package index: pip's isolated build environment installs no requirements
(pyproject.toml: ``requires = []``) and imports this module from
``backend-path``. Name and version are read from pyproject.toml's
[project] table (the few fields this project uses).
"""

import base64
import hashlib
import io
import os
import re
import tarfile
import zipfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE = "smolvm"
# Zip entries get this fixed time: the same tree builds the same wheel.
_EPOCH = (1980, 1, 1, 0, 0, 0)


def _project():
    """name, version, description, requires-python from pyproject.toml."""
    with open(os.path.join(ROOT, "pyproject.toml"), encoding="utf-8") as f:
        text = f.read()
    m = re.search(r"^\[project\]\s*$(.*?)(?=^\[|\Z)", text, re.M | re.S)
    if not m:
        raise RuntimeError("pyproject.toml has no [project] table")
    fields = dict(re.findall(r'^([a-z-]+)\s*=\s*"([^"]*)"\s*$', m.group(1), re.M))
    for k in ("name", "version"):
        if k not in fields:
            raise RuntimeError(f"pyproject.toml [project] has no {k}")
    return fields


def _dist_name(fields):
    return re.sub(r"[-_.]+", "_", fields["name"]).lower()


def _package_files():
    """(path relative to ROOT, absolute path) of every file of the package,
    sorted; caches and compiled files left out."""
    out = []
    for dirpath, dirnames, filenames in os.walk(os.path.join(ROOT, PACKAGE)):
        dirnames[:] = sorted(d for d in dirnames if d != "__pycache__")
        for fn in sorted(filenames):
            if fn.endswith((".pyc", ".pyo")):
                continue
            full = os.path.join(dirpath, fn)
            out.append((os.path.relpath(full, ROOT).replace(os.sep, "/"), full))
    return out


def _metadata(fields):
    lines = [
        "Metadata-Version: 2.1",
        f"Name: {fields['name']}",
        f"Version: {fields['version']}",
    ]
    if "description" in fields:
        lines.append(f"Summary: {fields['description']}")
    if "requires-python" in fields:
        lines.append(f"Requires-Python: {fields['requires-python']}")
    lines.append("License: Apache-2.0")
    body = ""
    readme = os.path.join(ROOT, "README.md")
    if os.path.exists(readme):
        lines.append("Description-Content-Type: text/markdown")
        with open(readme, encoding="utf-8") as f:
            body = f.read()
    return ("\n".join(lines) + "\n\n" + body).encode("utf-8")


def _wheel_file():
    return (
        "Wheel-Version: 1.0\n"
        "Generator: smolvm_build (in-tree)\n"
        "Root-Is-Purelib: true\n"
        "Tag: py3-none-any\n"
    ).encode("utf-8")


def _record_line(name, data):
    digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
    return f"{name},sha256={digest},{len(data)}"


def _write_wheel(wheel_directory, entries, fields):
    """entries: list of (archive name, bytes). Adds the dist-info files."""
    dist = _dist_name(fields)
    info = f"{dist}-{fields['version']}.dist-info"
    entries = list(entries) + [
        (f"{info}/METADATA", _metadata(fields)),
        (f"{info}/WHEEL", _wheel_file()),
    ]
    record = [_record_line(n, d) for n, d in entries] + [f"{info}/RECORD,,"]
    entries.append((f"{info}/RECORD", ("\n".join(record) + "\n").encode("utf-8")))
    name = f"{dist}-{fields['version']}-py3-none-any.whl"
    path = os.path.join(wheel_directory, name)
    tmp = path + ".tmp"
    with zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as z:
        for n, d in entries:
            zi = zipfile.ZipInfo(n, date_time=_EPOCH)
            zi.external_attr = 0o644 << 16
            zi.compress_type = zipfile.ZIP_DEFLATED
            z.writestr(zi, d)
    os.replace(tmp, path)
    return name


# -- PEP 517 hooks -------------------------------------------------------------


def get_requires_for_build_wheel(config_settings=None):
    return []


def get_requires_for_build_sdist(config_settings=None):
    return []


def get_requires_for_build_editable(config_settings=None):
    return []


def prepare_metadata_for_build_wheel(metadata_directory, config_settings=None):
    fields = _project()
    info = f"{_dist_name(fields)}-{fields['version']}.dist-info"
    d = os.path.join(metadata_directory, info)
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, "METADATA"), "wb") as f:
        f.write(_metadata(fields))
    with open(os.path.join(d, "WHEEL"), "wb") as f:
        f.write(_wheel_file())
    return info


def build_wheel(wheel_directory, config_settings=None, metadata_directory=None):
    entries = []
    for rel, full in _package_files():
        with open(full, "rb") as f:
            entries.append((rel, f.read()))
    return _write_wheel(wheel_directory, entries, _project())


def build_editable(wheel_directory, config_settings=None, metadata_directory=None):
    """PEP 660: a wheel with a .pth file that puts this tree on sys.path."""
    fields = _project()
    pth = (ROOT + "\n").encode("utf-8")
    return _write_wheel(wheel_directory, [(f"_{_dist_name(fields)}_editable.pth", pth)], fields)


def build_sdist(sdist_directory, config_settings=None):
    fields = _project()
    base = f"{_dist_name(fields)}-{fields['version']}"
    files = [("pyproject.toml", os.path.join(ROOT, "pyproject.toml"))]
    for extra in ("README.md", os.path.join("build_backend", "smolvm_build.py")):
        if os.path.exists(os.path.join(ROOT, extra)):
            files.append((extra.replace(os.sep, "/"), os.path.join(ROOT, extra)))
    files += _package_files()
    name = base + ".tar.gz"
    path = os.path.join(sdist_directory, name)
    tmp = path + ".tmp"
    with tarfile.open(tmp, "w:gz", format=tarfile.PAX_FORMAT) as tar:
        pkg_info = _metadata(fields)
        ti = tarfile.TarInfo(f"{base}/PKG-INFO")
        ti.size, ti.mode, ti.mtime = len(pkg_info), 0o644, 315532800
        tar.addfile(ti, io.BytesIO(pkg_info))
        for rel, full in files:
            with open(full, "rb") as f:
                data = f.read()
            ti = tarfile.TarInfo(f"{base}/{rel}")
            ti.size, ti.mode, ti.mtime = len(data), 0o644, 315532800
            tar.addfile(ti, io.BytesIO(data))
    os.replace(tmp, path)
    return name
