"""Run the chart's Argo CD health check (Lua) from Python, as Argo CD would run it."""

from __future__ import annotations

import json
import pathlib
from typing import Any

import lupa

SCRIPT = pathlib.Path(__file__).resolve().parents[1] / "charts/kquant/files/argocd-health.lua"


def health(obj: dict[str, Any]) -> dict[str, str]:
    """Argo CD hands the object to the script as the global ``obj``; it returns status and message."""
    runtime = lupa.LuaRuntime(unpack_returned_tuples=True)
    # Argo CD converts the JSON object into Lua tables; do the same through Lua's own structures.
    to_table = runtime.eval("""
        function(py, convert)
          local function walk(value)
            if python.builtins.isinstance(value, python.builtins.dict) then
              local t = {}
              for k in python.iter(value) do t[k] = walk(value[k]) end
              return t
            elseif python.builtins.isinstance(value, python.builtins.list) then
              local t = {}
              for i = 0, python.builtins.len(value) - 1 do t[i + 1] = walk(value[i]) end
              return t
            end
            return value
          end
          return walk(py)
        end
    """)
    runtime.globals().obj = to_table(json.loads(json.dumps(obj)), None)
    result = runtime.execute(SCRIPT.read_text())
    return {"status": str(result["status"]), "message": str(result["message"] or "")}
