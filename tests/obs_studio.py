"""Real OBS Studio for tests: headless under its own Xvfb, its WebSocket server on, its stream
output set to a given RTMP URL (started with ``start_stream()``: OBS 29's ``--startstreaming`` did
nothing here), all configuration in a throwaway HOME.

OBS 29 keeps obs-websocket's settings in ``global.ini`` ``[OBSWebSocket]`` (OBS 30 moved them to
``plugin_config/obs-websocket/config.json``; both are written). The canvas is 320x180 at 30 fps,
x264 ultrafast, so it costs little CPU.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import asyncio

import aiohttp

from plugins.sinks.obs import auth_string
from servers import free_port, is_listening, kill, wait_until

OBS = shutil.which("obs")
XVFB = shutil.which("Xvfb")


def available() -> bool:
    return bool(OBS and XVFB)


class ObsStudio:
    def __init__(self, home: Path, password: str, rtmp_server: str, stream_key: str) -> None:
        self.home, self.password = home, password
        self.port = free_port()
        cfg = home / ".config" / "obs-studio"
        profile = cfg / "basic" / "profiles" / "livecc"
        (cfg / "basic" / "scenes").mkdir(parents=True, exist_ok=True)
        profile.mkdir(parents=True, exist_ok=True)
        (cfg / "plugin_config" / "obs-websocket").mkdir(parents=True, exist_ok=True)
        (cfg / "global.ini").write_text(
            "[General]\nFirstRun=true\nEnableAutoUpdates=false\n\n"  # true: the first run (wizard) is done
            "[Basic]\nProfile=livecc\nProfileDir=livecc\nSceneCollection=livecc\nSceneCollectionFile=livecc\n\n"
            f"[OBSWebSocket]\nFirstLoad=false\nServerEnabled=true\nServerPort={self.port}\nAlertsEnabled=false\n"
            f"AuthRequired=true\nServerPassword={password}\n")
        (cfg / "plugin_config" / "obs-websocket" / "config.json").write_text(json.dumps(
            {"first_load": False, "server_enabled": True, "server_port": self.port, "alerts_enabled": False,
             "auth_required": True, "server_password": password}))
        (profile / "basic.ini").write_text(
            "[General]\nName=livecc\n\n[Video]\nBaseCX=320\nBaseCY=180\nOutputCX=320\nOutputCY=180\n"
            "FPSType=0\nFPSCommon=30\n\n[Output]\nMode=Simple\n\n"
            "[SimpleOutput]\nStreamEncoder=x264\nVBitrate=300\nPreset=ultrafast\nABitrate=64\n")
        (profile / "service.json").write_text(json.dumps(
            {"type": "rtmp_custom", "settings": {"server": rtmp_server, "key": stream_key, "use_auth": False}}))
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.port}"

    def start(self, timeout: float = 60) -> "ObsStudio":
        r, w = os.pipe()  # Xvfb writes the display number it picked to this fd
        self.xvfb = subprocess.Popen([XVFB, "-displayfd", str(w), "-screen", "0", "640x360x24", "-nolisten", "tcp"],
                                     pass_fds=(w,), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        os.close(w)
        with os.fdopen(r) as f:
            self.display = ":" + f.readline().strip()
        env = {"HOME": str(self.home), "XDG_CONFIG_HOME": str(self.home / ".config"), "PATH": "/usr/bin:/bin",
               "DISPLAY": self.display, "LIBGL_ALWAYS_SOFTWARE": "1"}
        self.log = open(self.home / "obs.log", "ab")
        self.proc = subprocess.Popen([OBS, "--disable-shutdown-check", "--minimize-to-tray", "--disable-updater"],
                                     env=env, stdin=subprocess.DEVNULL, stdout=self.log, stderr=self.log)
        wait_until(lambda: is_listening(self.port) or self.proc.poll() is not None, timeout, "OBS WebSocket")
        if self.proc.poll() is not None:
            raise RuntimeError(f"OBS exited: {(self.home / 'obs.log').read_text(errors='replace')[-800:]}")
        return self

    def stop(self) -> None:
        """End OBS (SIGKILL: a crash, as far as OBS knows) and its Xvfb."""
        if self.proc is not None:
            kill(self.proc)
            self.proc = None
            self.log.close()
            kill(self.xvfb)

    def request(self, kind: str, data: dict | None = None) -> dict:
        """One obs-websocket v5 request on a fresh connection; the RequestResponse's ``d``."""

        async def go() -> dict:
            async with aiohttp.ClientSession() as http:
                async with http.ws_connect(self.url, protocols=("obswebsocket.json",)) as ws:
                    auth = (await ws.receive_json(timeout=10))["d"]["authentication"]
                    await ws.send_json({"op": 1, "d": {"rpcVersion": 1, "eventSubscriptions": 0,
                                                       "authentication": auth_string(self.password, auth["salt"],
                                                                                     auth["challenge"])}})
                    assert (await ws.receive_json(timeout=10))["op"] == 2
                    await ws.send_json({"op": 6, "d": {"requestType": kind, "requestId": "t", "requestData": data or {}}})
                    return (await ws.receive_json(timeout=10))["d"]

        return asyncio.run(go())

    def start_stream(self, timeout: float = 30) -> None:
        self.request("StartStream")
        wait_until(lambda: self.request("GetStreamStatus")["responseData"]["outputActive"], timeout, "OBS streaming")
