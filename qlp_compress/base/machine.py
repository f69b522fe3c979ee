"""What the machine is: the CPU model and the instruction sets that make int8 fast (VNNI, AMX), for every report that
quotes a speed."""

from __future__ import annotations

import platform
from pathlib import Path


def cpu_capability(cpuinfo: Path = Path("/proc/cpuinfo")) -> dict:
    """The CPU's name and the int8 dot-product instructions onnxruntime's kernels can use, from /proc/cpuinfo
    (Linux); elsewhere only the platform's processor name. int8 speedups depend on these."""
    info = {"model": platform.processor() or platform.machine(), "family": None, "model_number": None}
    flags: set[str] = set()
    try:
        text = cpuinfo.read_text()
    except OSError:
        text = ""
    for line in text.split("\n\n", 1)[0].splitlines():  # the first processor's block
        key, _, value = (part.strip() for part in line.partition(":"))
        if key == "model name":
            info["model"] = value
        elif key == "cpu family":
            info["family"] = int(value) if value.isdigit() else value
        elif key == "model":
            info["model_number"] = int(value) if value.isdigit() else value
        elif key == "flags":
            flags = set(value.split())
    info.update(avx2="avx2" in flags, avx512="avx512f" in flags, avx512_vnni="avx512_vnni" in flags,
                avx_vnni="avx_vnni" in flags, amx=bool({"amx_int8", "amx_tile"} & flags), flags_read=bool(flags))
    return info


def describe_cpu(cpu: dict) -> str:
    """"Intel(R) Xeon(R) Processor (family 6, model 207): AVX2, AVX-512, AVX-512 VNNI, AVX-VNNI; no AMX": the vector
    extensions that decide float and int8 speed (and, for int8 without VNNI, how sums are formed)."""
    name = cpu["model"] + (f" (family {cpu['family']}, model {cpu['model_number']})" if cpu.get("family") else "")
    if not cpu.get("flags_read"):
        return f"{name}: instruction set unknown (no /proc/cpuinfo)"
    labels = {"avx2": "AVX2", "avx512": "AVX-512", "avx512_vnni": "AVX-512 VNNI", "avx_vnni": "AVX-VNNI", "amx": "AMX"}
    known = {key: label for key, label in labels.items() if key in cpu}  # results written before a key existed
    has = [label for key, label in known.items() if cpu[key]]
    lacks = [label for key, label in known.items() if not cpu[key]]
    return f"{name}: {', '.join(has) or 'no AVX2'}" + (f"; no {', no '.join(lacks)}" if lacks and has else "")
