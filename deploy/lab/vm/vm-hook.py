#!/usr/bin/python3
"""The start and stop hooks of a host that runs the lab's guests (deploy/lab/vm/vm.sh).

    vm-hook.py start --lab LAB.json     # boot the guests a recovery (or a failback) hands over
    vm-hook.py stop --lab LAB.json      # shut the host's guests down cleanly

Configured in the agent's own file (hooks are named, never sent by the controller), e.g.
    hooks:
      vm-start: "/usr/bin/python3 .../vm-hook.py start --lab /etc/ferry/lab-vm.json"
      vm-stop: "/usr/bin/python3 .../vm-hook.py stop --lab /etc/ferry/lab-vm.json"

LAB.json: {"guest": DIR (vmlinuz, initrd.img), "state": DIR (one directory per guest run),
           "home": NETWORK (where a failback boots), "networks": {NAME: {"netns": NS (its
           bridge br0), "cidr": "10.91.1.0/24", "gateway": "10.91.1.1"}}, "probe": [ADDR...]}

A recovery hands over FERRY_RECOVERY_FILE (JSON: "guests" as recorded for the source host,
their disks named as here; "networks", the plan's mapping; "network": production or test) and
FERRY_VOLUMES (NAME=SOCKET ...). Each guest boots with its own shape (CPUs, memory, NIC MACs).
Its NIC goes on the mapped network: the recovery network for a failover, with an address of
that network; the test network for a drill, keeping the production address (its identity),
where nothing answers it. A failback (FERRY_MODE=failback) has FERRY_GUESTS and goes home.
"""
import json
import os
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))


def log(message):
    print(f"vm-hook: {message}", flush=True)


def volumes():
    out = {}
    for item in os.environ.get("FERRY_VOLUMES", "").split():
        name, _, socket = item.partition("=")
        if name and socket:
            out[name] = socket
    return out


def boot(lab, guest, network_name, address_network, sockets, run):
    nets = lab["networks"]
    attach, identity = nets[network_name], nets[address_network]
    disks = []
    for v in guest["volumes"]:
        if v not in sockets:
            raise SystemExit(f"vm-hook: disk {v} of guest {guest['name']} was not handed over (FERRY_VOLUMES has {sorted(sockets)})")
        disks += ["--disk", f"nbd+unix:///{v}?socket={sockets[v]}"]
    state = os.path.join(lab["state"], f"{guest['name']}-{run}-{time.time_ns()}")
    args = [os.path.join(HERE, "vm.sh"), "start", "--state", state, "--name", guest["name"], "--guest", lab["guest"],
            "--cpus", str(guest["cpus"]), "--memory", str(max(64, guest["memoryBytes"] >> 20))] + disks
    nics = guest.get("nics") or []
    if nics:
        args += ["--mac", nics[0]["macAddress"], "--net", f"{identity['cidr']},{identity['gateway']}",
                 "--bridge-netns", attach["netns"], "--probe", ",".join(lab.get("probe", []))]
    with open(os.path.join(lab["state"], "runs.log"), "a") as f:
        f.write(json.dumps({"at": time.time(), "guest": guest["name"], "run": run, "state": state,
                            "attached": network_name, "identity": address_network, "cpus": guest["cpus"],
                            "memoryBytes": guest["memoryBytes"], "macs": [n["macAddress"] for n in nics]}) + "\n")
    subprocess.run(args, check=True)
    log(f"guest {guest['name']} booting on {network_name} as {address_network} ({state})")


def start(lab):
    sockets = volumes()
    mode = os.environ.get("FERRY_MODE", "")
    if mode == "failback":
        guests = json.loads(os.environ.get("FERRY_GUESTS", "[]"))
        for g in guests:
            boot(lab, g, lab["home"], lab["home"], sockets, "home")
        if not guests:
            log("no guest recorded for these volumes: nothing to boot")
        return
    with open(os.environ["FERRY_RECOVERY_FILE"]) as f:
        description = json.load(f)
    guests = description.get("guests") or []
    if not guests:
        log("the recovery names no guest: nothing to boot")
        return
    mapping = (description.get("networks") or [{}])[0]
    drill = description.get("network") == "test"
    run = os.environ.get("FERRY_RECOVERY_ID", "recovery")
    for g in guests:
        if drill:
            # Production's identity on the isolated test network.
            boot(lab, g, mapping.get("test") or "test", mapping["source"], sockets, run)
        else:
            boot(lab, g, mapping["recovery"], mapping["recovery"], sockets, run)


def stop(lab):
    # This host's guests (of this recovery, when a recovery is stopped): a clean shutdown each.
    run = os.environ.get("FERRY_RECOVERY_ID")
    root = lab["state"]
    failed = False
    for entry in sorted(os.listdir(root)) if os.path.isdir(root) else []:
        state = os.path.join(root, entry)
        if not os.path.exists(os.path.join(state, "qemu.pid")):
            continue
        if run and f"-{run}-" not in entry:
            continue
        r = subprocess.run([os.path.join(HERE, "vm.sh"), "stop", "--state", state, "--timeout", "60"])
        failed |= r.returncode != 0
        log(f"guest in {state} stopped" + (" (not cleanly)" if r.returncode else ""))
    if failed:
        raise SystemExit(1)


def main():
    if len(sys.argv) != 4 or sys.argv[1] not in ("start", "stop") or sys.argv[2] != "--lab":
        raise SystemExit("usage: vm-hook.py start|stop --lab LAB.json")
    with open(sys.argv[3]) as f:
        lab = json.load(f)
    os.makedirs(lab["state"], exist_ok=True)
    (start if sys.argv[1] == "start" else stop)(lab)


if __name__ == "__main__":
    main()
