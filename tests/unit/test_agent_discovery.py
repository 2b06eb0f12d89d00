"""Host discovery on fake /proc and /sys trees (and once on this machine), and the agent's reporting rules
(hello every tick, the hardware at start, on a change, after a failure and every N hellos) on the
in-memory bus."""

from __future__ import annotations

import asyncio
import errno
import os
from datetime import UTC, datetime
from pathlib import Path

import pytest

from schemas.inventory import AgentHello, AgentInventory, Hardware
from services.core.brokerauth import PolicyError
from services.core.bus.abc import ConsumerOptions, RawDelivery
from services.core.bus.codec import decode
from services.core.bus.memory import InMemoryBroker, InMemoryTransport
from services.inventory.agent import discovery
from services.inventory.agent.agent import HostAgent, hardware_fingerprint
from services.inventory.agent.discovery import (
    discover,
    parse_cpu_list,
    parse_cpuinfo,
    parse_meminfo,
    parse_uptime,
    read_cpus,
    read_disks,
    read_memory,
    read_ports,
)

NOW = datetime(2026, 11, 21, 8, 0, tzinfo=UTC)


# -- the fake tree --------------------------------------------------------------------------------


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def link(path: Path, target: Path | str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    os.symlink(target, path)


def cpuinfo(count: int, model: str = "Intel(R) Xeon(R) Gold 6338N CPU @ 2.20GHz") -> str:
    """x86 /proc/cpuinfo of 2 sockets x 2 cores x 2 threads: cpus 0-3 the first threads, 4-7 their siblings."""
    stanzas = []
    for cpu in range(count):
        first = cpu % 4
        stanzas.append(f"processor\t: {cpu}\nvendor_id\t: GenuineIntel\nmodel name\t: {model}\n"
                       f"physical id\t: {first // 2}\nsiblings\t: 4\ncore id\t\t: {first % 2}\ncpu cores\t: 2\n"
                       "flags\t\t: fpu vme de pse\n")
    return "\n".join(stanzas) + "\n"


def make_cpus(root: Path) -> None:
    write(root / "proc" / "cpuinfo", cpuinfo(8))
    base = root / "sys" / "devices" / "system" / "cpu"
    for cpu in range(8):
        first = cpu % 4
        topology = base / f"cpu{cpu}" / "topology"
        write(topology / "physical_package_id", f"{first // 2}\n")
        write(topology / "core_id", f"{first % 2}\n")
        write(topology / "thread_siblings_list", f"{first},{first + 4}\n")
    (base / "cpu8").mkdir()                     # offline: no topology directory
    (base / "cpufreq").mkdir()
    write(base / "online", "0-7\n")


MEMINFO = """MemTotal:       24684084 kB
MemFree:        23799964 kB
MemAvailable:   23968220 kB
Buffers:           10240 kB
HugePages_Total:       0
"""


def make_disk(root: Path, name: str, *, sectors: int, rotational: str | None = None, model: str | None = None,
              serial: str | None = None, own_serial: str | None = None, device: bool = True) -> None:
    if device:
        real = root / "sys" / "devices" / "pci0000:00" / "0000:00:1f.2" / name
        real.mkdir(parents=True)
        if model is not None:
            write(real / "model", f"{model}   \n")
        if serial is not None:
            write(real / "serial", f"{serial}\n")
    else:
        real = root / "sys" / "devices" / "virtual" / "block" / name
    block = root / "sys" / "devices" / "block" / name
    write(block / "size", f"{sectors}\n")
    if rotational is not None:
        write(block / "queue" / "rotational", f"{rotational}\n")
    if own_serial is not None:
        write(block / "serial", f"{own_serial}\n")
    if device:
        link(block / "device", real)
    link(root / "sys" / "block" / name, block)


def make_disks(root: Path) -> None:
    make_disk(root, "sda", sectors=1953525168, rotational="1", model="ST1000NM0033-9ZM")   # 1 TB (953869 MiB)
    make_disk(root, "nvme0n1", sectors=3907029168, rotational="0", model="SAMSUNG MZQL21T9HCJR-00A07",
              serial="S64GNE0R123456")
    make_disk(root, "vda", sectors=536870912, rotational="0", own_serial="overlayblk")
    make_disk(root, "sdb", sectors=0)                                    # no queue/rotational: unknown
    make_disk(root, "loop0", sectors=2048, rotational="1", device=False)
    make_disk(root, "loop1", sectors=2048, rotational="1", device=True)  # skipped by name, even with a device
    make_disk(root, "zram0", sectors=8192, rotational="0", device=False)
    make_disk(root, "dm-0", sectors=8192, rotational="0", device=False)
    make_disk(root, "sr0", sectors=2048, rotational="1", model="QEMU DVD-ROM")
    make_disk(root, "ram0", sectors=8192, rotational="0", device=False)


def make_pci(root: Path, address: str) -> Path:
    dev = root / "sys" / "devices" / "pci0000:00" / address
    dev.mkdir(parents=True, exist_ok=True)
    if not os.path.lexists(dev / "subsystem"):
        link(dev / "subsystem", root / "sys" / "bus" / "pci")
    return dev


def make_net(root: Path, name: str, *, mac: str, operstate: str, speed: str | None = None, mtu: int = 1500,
             device: Path | None = None, driver: str | None = None, carrier: str | None = None) -> Path:
    netdev = root / "sys" / "devices" / "net" / name
    write(netdev / "address", mac + "\n")
    write(netdev / "operstate", operstate + "\n")
    write(netdev / "mtu", f"{mtu}\n")
    if speed is not None:
        write(netdev / "speed", speed + "\n")
    if carrier is not None:
        write(netdev / "carrier", carrier + "\n")
    if device is not None:
        link(netdev / "device", device)
        if driver is not None and not os.path.lexists(device / "driver"):
            link(device / "driver", root / "sys" / "bus" / "pci" / "drivers" / driver)
    link(root / "sys" / "class" / "net" / name, netdev)
    return netdev


def make_ports(root: Path) -> None:
    make_net(root, "lo", mac="00:00:00:00:00:00", operstate="unknown", mtu=65536)
    make_net(root, "eno1", mac="3C:FD:FE:A1:B2:C3", operstate="up", speed="10000",
             device=make_pci(root, "0000:3b:00.0"), driver="ixgbe")
    make_net(root, "eno2", mac="3c:fd:fe:a1:b2:c4", operstate="down", speed="-1",
             device=make_pci(root, "0000:3b:00.1"), driver="ixgbe")
    make_net(root, "eno3", mac="3c:fd:fe:a1:b2:c5", operstate="down", speed="",          # EINVAL, see below
             device=make_pci(root, "0000:3b:00.2"), driver="ixgbe")
    virtio_pci = make_pci(root, "0000:00:03.0")
    virtio = virtio_pci / "virtio2"
    virtio.mkdir()
    link(virtio / "subsystem", root / "sys" / "bus" / "virtio")
    link(virtio / "driver", root / "sys" / "bus" / "virtio" / "drivers" / "virtio_net")
    make_net(root, "ens3", mac="52:54:00:12:34:56", operstate="unknown", carrier="1", mtu=9000, device=virtio)
    usb = root / "sys" / "devices" / "pci0000:00" / "0000:00:14.0" / "usb2" / "2-1" / "2-1:1.0"
    usb.mkdir(parents=True)
    link(usb / "subsystem", root / "sys" / "bus" / "usb")
    link(usb / "driver", root / "sys" / "bus" / "usb" / "drivers" / "r8152")
    make_net(root, "enx00e04c680001", mac="00:e0:4c:68:00:01", operstate="up", speed="1000", device=usb)
    make_net(root, "br0", mac="3c:fd:fe:a1:b2:c3", operstate="up")                      # bridge: eno1's MAC
    make_net(root, "veth1a2b", mac="ae:10:32:aa:bb:cc", operstate="up", speed="10000")


def make_identity(root: Path, *, boot_id: str = "3a49210b-7378-4e0c-92b7-1275f177e82f") -> None:
    write(root / "proc" / "meminfo", MEMINFO)
    write(root / "proc" / "uptime", "433.06 713.86\n")
    write(root / "proc" / "sys" / "kernel" / "random" / "boot_id", boot_id + "\n")
    write(root / "proc" / "sys" / "kernel" / "hostname", "worker-7\n")


@pytest.fixture
def machine(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    root = tmp_path / "host"
    make_cpus(root)
    make_disks(root)
    make_ports(root)
    make_identity(root)
    einval = root / "sys" / "devices" / "net" / "eno3" / "speed"
    real_read_text = Path.read_text

    def read_text(self: Path, *args: object, **kwargs: object) -> str:
        if self == einval:          # what the kernel does for the speed of a link that is down
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_read_text(self, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(Path, "read_text", read_text)
    return root


# -- CPUs -----------------------------------------------------------------------------------------


def test_two_sockets_of_two_cores_of_two_threads(machine: Path) -> None:
    cpus = read_cpus(machine)
    assert [c.cpu for c in cpus] == list(range(8)), "cpu8 is offline (no topology) and left out"
    layout = {(c.socket, c.core, c.thread): c.cpu for c in cpus}
    assert layout == {(0, 0, 0): 0, (0, 1, 0): 1, (1, 0, 0): 2, (1, 1, 0): 3,
                      (0, 0, 1): 4, (0, 1, 1): 5, (1, 0, 1): 6, (1, 1, 1): 7}
    assert {c.model for c in cpus} == {"Intel(R) Xeon(R) Gold 6338N CPU @ 2.20GHz"}


def test_without_sysfs_topology_cpuinfo_alone_gives_the_layout(tmp_path: Path) -> None:
    write(tmp_path / "proc" / "cpuinfo", cpuinfo(8, model="AMD EPYC"))
    cpus = read_cpus(tmp_path)
    assert [(c.cpu, c.socket, c.core, c.thread) for c in cpus] == [
        (0, 0, 0, 0), (1, 0, 1, 0), (2, 1, 0, 0), (3, 1, 1, 0), (4, 0, 0, 1), (5, 0, 1, 1), (6, 1, 0, 1), (7, 1, 1, 1)]
    assert all(c.model == "AMD EPYC" for c in cpus)


def test_cpuinfo_of_an_arm_machine_names_the_model_once() -> None:
    text = ("Processor\t: AArch64 Processor rev 4 (aarch64)\n"
            "processor\t: 0\nBogoMIPS\t: 38.40\nCPU part\t: 0xd08\n\n"
            "processor\t: 1\nBogoMIPS\t: 38.40\nCPU part\t: 0xd08\n\n"
            "Hardware\t: BCM2835\n")
    infos = parse_cpuinfo(text)
    assert [(i.processor, i.model, i.physical_id, i.core_id) for i in infos] == [
        (0, "AArch64 Processor rev 4 (aarch64)", None, None), (1, "AArch64 Processor rev 4 (aarch64)", None, None)]


def test_a_package_id_of_minus_one_is_socket_zero(tmp_path: Path) -> None:
    topology = tmp_path / "sys" / "devices" / "system" / "cpu" / "cpu0" / "topology"
    write(topology / "physical_package_id", "-1\n")
    write(topology / "core_id", "0\n")
    write(topology / "thread_siblings_list", "0\n")
    [cpu] = read_cpus(tmp_path)
    assert (cpu.socket, cpu.core, cpu.thread, cpu.model) == (0, 0, 0, "")


@pytest.mark.parametrize(("text", "cpus"), [
    ("0-3,8,10-11\n", [0, 1, 2, 3, 8, 10, 11]), ("0\n", [0]), ("4,0", [0, 4]), ("", []), ("x,2,3-1", [2])])
def test_cpu_lists(text: str, cpus: list[int]) -> None:
    assert parse_cpu_list(text) == cpus


# -- memory ---------------------------------------------------------------------------------------


def test_memory_in_mib(machine: Path) -> None:
    memory = read_memory(machine)
    assert memory is not None
    assert (memory.total_mib, memory.available_mib) == (24105, 23406)


def test_meminfo_without_available_or_total() -> None:
    memory = parse_meminfo("MemTotal:  2048 kB\nMemFree: 1024 kB\n")
    assert memory is not None and (memory.total_mib, memory.available_mib) == (2, None)
    assert parse_meminfo("MemFree: 1024 kB\n") is None
    assert read_memory("/nonexistent-root") is None


# -- disks ----------------------------------------------------------------------------------------


def test_disks_are_the_whole_disks_backed_by_a_device(machine: Path) -> None:
    disks = {d.device_node: d for d in read_disks(machine)}
    assert sorted(disks) == ["/dev/nvme0n1", "/dev/sda", "/dev/sdb", "/dev/vda"]
    sda, nvme, vda, sdb = disks["/dev/sda"], disks["/dev/nvme0n1"], disks["/dev/vda"], disks["/dev/sdb"]
    assert (sda.type, sda.size_mib, sda.model, sda.serial) == ("HDD", 953869, "ST1000NM0033-9ZM", "")
    assert (nvme.type, nvme.size_mib, nvme.model, nvme.serial) == (
        "NVME", 1907729, "SAMSUNG MZQL21T9HCJR-00A07", "S64GNE0R123456")
    assert (vda.type, vda.size_mib, vda.serial) == ("SSD", 262144, "overlayblk")
    assert (sdb.type, sdb.size_mib) == ("unknown", 0)


# -- ports ----------------------------------------------------------------------------------------


def test_ports_are_the_interfaces_backed_by_a_device(machine: Path) -> None:
    ports = {p.name: p for p in read_ports(machine)}
    assert sorted(ports) == ["eno1", "eno2", "eno3", "ens3", "enx00e04c680001"], "no lo, bridge or veth"
    eno1 = ports["eno1"]
    assert (eno1.mac, eno1.speed_mbps, eno1.link, eno1.mtu, eno1.driver, eno1.pci_address) == (
        "3c:fd:fe:a1:b2:c3", 10000, "up", 1500, "ixgbe", "0000:3b:00.0")
    for down in (ports["eno2"], ports["eno3"]):          # speed -1, and a speed file that fails with EINVAL
        assert (down.link, down.speed_mbps, down.driver) == ("down", None, "ixgbe")
    assert ports["eno3"].pci_address == "0000:3b:00.2"
    ens3 = ports["ens3"]
    assert (ens3.link, ens3.speed_mbps, ens3.mtu, ens3.driver, ens3.pci_address) == (
        "up", None, 9000, "virtio_net", "0000:00:03.0"), "virtio: the PCI function it sits on; link from carrier"
    usb = ports["enx00e04c680001"]
    assert (usb.driver, usb.pci_address, usb.speed_mbps) == ("r8152", None, 1000), "a USB NIC is no PCI device"


def test_virtual_interfaces_only_when_asked_and_never_lo(machine: Path) -> None:
    names = [p.name for p in read_ports(machine, include_virtual=True)]
    assert "br0" in names and "veth1a2b" in names and "lo" not in names
    br0 = next(p for p in read_ports(machine, include_virtual=True) if p.name == "br0")
    assert (br0.driver, br0.pci_address, br0.speed_mbps) == (None, None, None)


def test_a_mac_that_is_not_ethernet_or_is_zero_is_none(tmp_path: Path) -> None:
    dev = make_pci(tmp_path, "0000:5e:00.0")
    make_net(tmp_path, "ib0", mac="80:00:02:08:fe:80:00:00:00:00:00:00:00:02:c9:03:00:0e:7c:81", operstate="up",
             device=dev, driver="ib_ipoib")
    make_net(tmp_path, "eth9", mac="00:00:00:00:00:00", operstate="weird", device=make_pci(tmp_path, "0000:5e:00.1"))
    ports = {p.name: p for p in read_ports(tmp_path)}
    assert ports["ib0"].mac is None and ports["eth9"].mac is None
    assert ports["eth9"].link == "unknown"


# -- everything -----------------------------------------------------------------------------------


def test_discover_the_fake_machine(machine: Path) -> None:
    found = discover(machine, now=NOW)
    assert (found.os_hostname, found.boot_id, found.uptime_seconds) == (
        "worker-7", "3a49210b-7378-4e0c-92b7-1275f177e82f", 433)
    assert found.macs == ["3c:fd:fe:a1:b2:c3", "3c:fd:fe:a1:b2:c4", "3c:fd:fe:a1:b2:c5", "52:54:00:12:34:56",
                          "00:e0:4c:68:00:01"]
    hw = found.hardware
    assert (hw.source, hw.reported_at) == ("agent", NOW)
    assert (len(hw.cpus), len(hw.disks), len(hw.ports)) == (8, 4, 5)
    assert Hardware.model_validate_json(hw.model_dump_json()) == hw
    # with the bridge and veth, br0's MAC (eno1's) is listed once
    assert discover(machine, include_virtual_ports=True).macs.count("3c:fd:fe:a1:b2:c3") == 1


def test_an_empty_root_is_an_empty_machine_not_an_error(tmp_path: Path) -> None:
    found = discover(tmp_path, now=NOW)
    assert found.hardware.cpus == [] and found.hardware.memory is None
    assert found.hardware.disks == [] and found.hardware.ports == [] and found.macs == []
    assert (found.os_hostname, found.boot_id, found.uptime_seconds) == ("", "", 0)
    assert parse_uptime("") is None and parse_uptime("abc") is None


def test_this_machine() -> None:
    found = discover("/")
    hw = found.hardware
    assert len(hw.cpus) >= 1 and len(hw.cpus) == len({c.cpu for c in hw.cpus})
    assert len(hw.cpus) <= (os.cpu_count() or 1)
    assert hw.memory is not None and hw.memory.total_mib > 0
    assert hw.memory.available_mib is not None and 0 < hw.memory.available_mib <= hw.memory.total_mib
    assert len(found.boot_id) == 36 and found.uptime_seconds > 0
    assert found.os_hostname
    net = Path("/sys/class/net")
    expected = set()
    for iface in net.iterdir():
        if iface.name == "lo":
            continue
        mac = (iface / "address").read_text().strip().lower()
        if (iface / "device").exists() and mac != "00:00:00:00:00:00" and len(mac) == 17:
            expected.add(mac)
        elif not (iface / "device").exists():
            assert iface.name not in {p.name for p in hw.ports}, f"{iface.name} is virtual"
    assert set(found.macs) == expected
    for disk in hw.disks:
        name = disk.device_node.removeprefix("/dev/")
        assert not name.startswith(discovery.SKIPPED_DISK_PREFIXES)
        assert disk.size_mib == int((Path("/sys/block") / name / "size").read_text()) * 512 // (1024 * 1024)


# -- the agent's reporting rules (in-memory bus) ----------------------------------------------------


class Recorder:
    def __init__(self) -> None:
        self.seen: list[tuple[str, str]] = []     # (subject, type)
        self.data: list[AgentHello | AgentInventory] = []

    async def __call__(self, delivery: RawDelivery) -> None:
        envelope = decode(delivery.body)
        self.seen.append((delivery.subject, envelope.type))
        model = AgentHello if envelope.type == "roost.agent.hello" else AgentInventory
        self.data.append(model.model_validate(envelope.data))
        await delivery.ack()

    def types(self) -> list[str]:
        return [t.removeprefix("roost.agent.") for _, t in self.seen]


async def listening(broker: InMemoryBroker) -> tuple[Recorder, InMemoryTransport]:
    recorder = Recorder()
    transport = InMemoryTransport(broker)
    await transport.connect()
    await transport.subscribe("roost.agent.>", "inventory", recorder, ConsumerOptions())
    return recorder, transport


async def settled(recorder: Recorder, count: int) -> None:
    from tests.support.waiting import wait_until

    await wait_until(lambda: len(recorder.seen) >= count, 5.0, f"{count} messages")


async def test_agent_reports_at_start_on_change_after_failure_and_every_n_hellos(machine: Path) -> None:
    broker = InMemoryBroker()
    recorder, listener = await listening(broker)
    agent = HostAgent("worker-7", "nats://unused:4222", root=machine, inventory_every=3,
                      transport=InMemoryTransport(broker), clock=lambda: NOW, publish_timeout=0.3)
    await agent.bus.connect()
    try:
        first = await agent.tick()
        assert (first.hello, first.inventory) == (True, True)
        await settled(recorder, 2)
        assert recorder.seen == [("roost.agent.worker-7.hello", "roost.agent.hello"),
                                 ("roost.agent.worker-7.inventory", "roost.agent.inventory")]
        hello, inventory = recorder.data
        assert isinstance(hello, AgentHello) and isinstance(inventory, AgentInventory)
        assert (hello.agent, hello.os_hostname, hello.boot_id, hello.uptime_seconds, hello.interval_seconds) == (
            "worker-7", "worker-7", "3a49210b-7378-4e0c-92b7-1275f177e82f", 433, 30.0)
        assert "3c:fd:fe:a1:b2:c3" in hello.macs and len(hello.macs) == 5
        assert inventory.hardware == discover(machine, now=NOW).hardware

        # memory available moves all the time: not a change
        write(machine / "proc" / "meminfo", MEMINFO.replace("23968220", "1000000"))
        assert (await agent.tick()).inventory_due is False
        # a link going down is
        write(machine / "sys" / "devices" / "net" / "eno1" / "operstate", "down\n")
        assert (await agent.tick()).inventory is True
        await settled(recorder, 5)
        assert recorder.types() == ["hello", "inventory", "hello", "hello", "inventory"]
        assert isinstance(recorder.data[-1], AgentInventory)
        assert next(p for p in recorder.data[-1].hardware.ports if p.name == "eno1").link == "down"

        # nothing changes: the hardware again after 3 hellos
        for _ in range(3):
            await agent.tick()
        await settled(recorder, 9)
        assert recorder.types()[5:] == ["hello", "hello", "hello", "inventory"]

        # a report the broker did not take is sent again on the next tick
        write(machine / "sys" / "devices" / "net" / "eno1" / "operstate", "up\n")
        async with broker.outage():
            failed = await agent.tick()
            assert (failed.hello, failed.inventory, failed.inventory_due) == (False, False, True)
        retried = await agent.tick()
        assert (retried.hello, retried.inventory) == (True, True)
        assert agent.hellos_sent == 7 and agent.inventories_sent == 4
    finally:
        await agent.bus.close()
        await listener.close()


async def test_agent_run_stops_cleanly_and_runs_its_components(machine: Path) -> None:
    broker = InMemoryBroker()
    recorder, listener = await listening(broker)
    events: list[str] = []

    class Component:
        name = "probe"

        async def start(self, agent: HostAgent) -> None:
            events.append(f"start {agent.subject('heartbeat')}")

        async def stop(self) -> None:
            events.append("stop")

    agent = HostAgent("worker-7", "nats://unused:4222", root=machine, interval=3600,
                      transport=InMemoryTransport(broker), components=[Component()])
    task = asyncio.create_task(agent.run())
    await settled(recorder, 2)
    agent.stop()
    await asyncio.wait_for(task, 5)
    assert events == ["start roost.agent.worker-7.heartbeat", "stop"]
    assert not agent.bus.transport.connected
    await listener.close()


def test_agent_names_and_credentials_are_checked() -> None:
    with pytest.raises(PolicyError, match="bad agent host name"):
        HostAgent("Worker_7", "nats://127.0.0.1:4222")
    with pytest.raises(ValueError, match="logs in as agent-other"):
        HostAgent("worker-7", "nats://agent-other:pw@127.0.0.1:4222")
    agent = HostAgent("worker-7", "nats://127.0.0.1:4222", password="s3cret-Pw")
    assert agent.where == "nats://agent-worker-7:***@127.0.0.1:4222"
    with pytest.raises(ValueError, match="interval"):
        HostAgent("worker-7", "nats://127.0.0.1:4222", interval=0)


def test_fingerprint_ignores_the_time_and_the_memory_available(machine: Path) -> None:
    one = discover(machine, now=NOW).hardware
    two = one.model_copy(update={"reported_at": datetime(2030, 1, 1, tzinfo=UTC),
                                 "memory": one.memory.model_copy(update={"available_mib": 1}) if one.memory else None})
    assert hardware_fingerprint(one) == hardware_fingerprint(two)
    three = one.model_copy(update={"disks": one.disks[:1]})
    assert hardware_fingerprint(one) != hardware_fingerprint(three)
