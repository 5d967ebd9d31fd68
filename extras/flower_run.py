"""One command for a Flower deployment of flower_app.py on this machine, with the same flags as train.py:

    python flower_run.py --nodes 3 --clients 3 --methods feddpa-t --rounds 3

starts a SuperLink and one SuperNode per client as separate processes on 127.0.0.1 (free ports, each
with its own FLWR_HOME under --work), runs the app with `flwr run`, streams its output, checks how the
run ended (`flwr run` exits 0 even when the ServerApp fails) and stops every process it started, by
its own process group, on exit, error or Ctrl-C. With --superlink HOST:PORT it runs the app on a
federation that is already up instead (the SuperNodes started on the client machines, see the README).

The loopback deployment runs with TLS and SuperNode authentication unless --insecure: it writes a CA,
the SuperLink's certificate for 127.0.0.1 and localhost, and one key pair per node into --work, and
registers the nodes' public keys with the SuperLink before they start; a node whose key is not
registered, or that does not trust the CA, is refused.

Top to bottom: free ports and waiting; certificates and node keys; Deployment (the processes, the app's
run and its status); main.
"""
import argparse
import datetime
import glob
import ipaddress
import json
import os
import shlex
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import time
import urllib.request

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the project: pyproject.toml names the app
ENV = {"FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_UPDATE_CHECK": "1", "PYTHONUNBUFFERED": "1"}
PATH_FLAGS = ("--out", "--resume", "--data", "--model", "--cache", "--init-adapter")  # made absolute for the apps


BIN = os.path.dirname(sys.executable)  # flwr's executables sit beside the interpreter that has flwr installed
EXECUTABLES = ("flwr", "flower-superlink", "flower-supernode")


def missing_executable() -> str:
    """The first of flwr's executables found neither beside this interpreter nor on PATH ('' if none)."""
    path = BIN + os.pathsep + os.environ.get("PATH", "")
    return next((name for name in EXECUTABLES if shutil.which(name, path=path) is None), "")


class DeployError(Exception):
    """Something of the deployment failed; the message is one line."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def reachable(address: str, timeout: float = 5.0) -> str:
    """'' if something listens at host:port, else why not."""
    host, _, port = address.rpartition(":")
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=timeout):
            return ""
    except (OSError, ValueError) as e:
        return str(e) or type(e).__name__


def process_table() -> list:
    """(pid, state, parent pid, process group) of every process, from /proc (elsewhere none)."""
    table = []
    for p in glob.glob("/proc/[0-9]*/stat"):
        try:
            with open(p) as f:
                state, ppid, pgid = f.read().rsplit(")", 1)[1].split()[:3]
            table.append((int(p.split("/")[2]), state, int(ppid), int(pgid)))
        except (OSError, ValueError, IndexError):
            continue
    return table


def descendants(pid: int) -> list:
    """The processes pid started, and theirs (from /proc; elsewhere none are known beyond the group)."""
    children = {}
    for child, _, ppid, _ in process_table():
        children.setdefault(ppid, []).append(child)
    found, todo = [], [pid]
    while todo:
        for c in children.get(todo.pop(), []):
            found.append(c)
            todo.append(c)
    return found


def write_certificates(folder: str) -> dict:
    """A self-signed CA and, signed by it, the SuperLink's certificate for the loopback names (IP 127.0.0.1,
    DNS localhost) and its key, as PEM files in folder: {"ca": ca.crt, "cert": server.pem, "key": server.key}.
    Made afresh for each deployment, so that no key outlives its work folder; docs/flower.md has the
    openssl commands that make the same. (cryptography comes with flwr.)"""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    def certificate(subject: str, key, issuer: str, issuer_key, extensions: list):
        now = datetime.datetime.now(datetime.timezone.utc)
        builder = (x509.CertificateBuilder().public_key(key.public_key()).serial_number(x509.random_serial_number())
                   .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
                   .issuer_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, issuer)]))
                   .not_valid_before(now - datetime.timedelta(minutes=5))
                   .not_valid_after(now + datetime.timedelta(days=30)))
        identifiers = [(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), False),
                       (x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer_key.public_key()), False)]
        for extension, critical in identifiers + extensions:  # what strict verifiers (Python 3.13's default) ask
            builder = builder.add_extension(extension, critical=critical)
        return builder.sign(issuer_key, hashes.SHA384())

    signs_certificates = x509.KeyUsage(digital_signature=False, content_commitment=False, key_encipherment=False,
                                       data_encipherment=False, key_agreement=False, key_cert_sign=True, crl_sign=True,
                                       encipher_only=False, decipher_only=False)
    loopback = x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1")), x509.DNSName("localhost")])
    ca_key, server_key = ec.generate_private_key(ec.SECP384R1()), ec.generate_private_key(ec.SECP384R1())
    ca_name = "FedDPA loopback CA"
    ca = certificate(ca_name, ca_key, ca_name, ca_key, [(x509.BasicConstraints(ca=True, path_length=0), True),
                                                        (signs_certificates, True)])
    server = certificate("localhost", server_key, ca_name, ca_key, [
        (x509.BasicConstraints(ca=False, path_length=None), True),
        (x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), False), (loopback, False)])
    os.makedirs(folder, exist_ok=True)
    paths = {"ca": os.path.join(folder, "ca.crt"), "cert": os.path.join(folder, "server.pem"),
             "key": os.path.join(folder, "server.key")}
    write_private(paths["key"], server_key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                         serialization.NoEncryption()))
    for which, cert in (("ca", ca), ("cert", server)):
        with open(paths[which], "wb") as f:
            f.write(cert.public_bytes(serialization.Encoding.PEM))
    return paths


def write_node_key(path: str) -> str:
    """A SuperNode's authentication key pair, as Flower reads it: a NIST P-384 EC key, the private one in
    OpenSSH format at path (what `ssh-keygen -t ecdsa -b 384` writes), the public one at path.pub.
    Returns the public key's path, the file the SuperLink registers."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    key = ec.generate_private_key(ec.SECP384R1())
    os.makedirs(os.path.dirname(path), exist_ok=True)
    write_private(path, key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                                          serialization.NoEncryption()))
    with open(path + ".pub", "wb") as f:
        f.write(key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH))
    return path + ".pub"


def write_private(path: str, data: bytes):
    """Write a private key, readable by its owner only."""
    with open(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "wb") as f:
        f.write(data)


def threads_per_node(nodes: int) -> int:
    """torch threads for each of `nodes` SuperNodes sharing this machine's cores. More threads than cores
    in all would make every op's threads wait at its barrier for one that is not running: a small
    model's ClientApp ran 20x slower so. (The thread count can change a float sum's order: compare a
    deployment with train.py at the same count.)"""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, cores // nodes)


class Deployment:
    """The processes of one deployment of `nodes` SuperNodes on this machine, each in its own process
    group with its own FLWR_HOME and log under `work`; close() stops every one of them. Secure unless
    `insecure`: TLS, with the CA certificate at `ca`, and only registered nodes admitted."""

    def __init__(self, work: str, nodes: int, insecure: bool = False):
        self.work = work
        os.makedirs(work, exist_ok=True)
        self.procs = {}  # name -> Popen
        self.superlink = ""
        self.insecure = insecure
        self.ca = ""  # the CA that the SuperLink's certificate is checked against (start_superlink makes it)
        self.threads = threads_per_node(nodes)

    def env(self, name: str, **extra) -> dict:
        """Process `name`'s environment: its own FLWR_HOME under `work`, and `extra`."""
        home = os.path.join(self.work, name)
        os.makedirs(home, exist_ok=True)
        # PATH: flwr's executables (and the ones they start) from beside this interpreter, activated or not
        path = BIN + os.pathsep + os.environ.get("PATH", "")
        return {**os.environ, **ENV, "PATH": path, "FLWR_HOME": home, **extra}

    def start(self, name: str, argv: list, **extra_env):
        log = open(os.path.join(self.work, f"{name}.log"), "ab")
        self.procs[name] = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=self.env(name, **extra_env),
                                            cwd=self.work, start_new_session=True)
        log.close()

    def log_tail(self, name: str, lines: int = 5) -> str:
        with open(os.path.join(self.work, f"{name}.log"), errors="replace") as f:
            return " | ".join(line.strip() for line in f.read().splitlines()[-lines:] if line.strip())

    def start_superlink(self, timeout: float = 60.0):
        """The SuperLink on a free port of 127.0.0.1: with TLS, by a certificate of a CA made for it under
        `work`, and SuperNode authentication (only nodes whose keys register() registered get in)."""
        port = free_port()
        if self.insecure:
            security, context = ["--insecure"], None
        else:
            certs = write_certificates(os.path.join(self.work, "certs"))
            self.ca, context = certs["ca"], ssl.create_default_context(cafile=certs["ca"])
            security = ["--ssl-ca-certfile", certs["ca"], "--ssl-certfile", certs["cert"],
                        "--ssl-keyfile", certs["key"], "--enable-supernode-auth"]
        self.start("superlink", ["flower-superlink", *security, "--host", "127.0.0.1", "--port", str(port),
                                 "--disable-runtime-dependency-installation"])
        health = f"{'http' if self.insecure else 'https'}://127.0.0.1:{port}/health"
        t0 = time.time()
        while True:  # ready when its health endpoint answers
            try:
                urllib.request.urlopen(health, timeout=2, context=context)
                break
            except OSError:
                if self.procs["superlink"].poll() is not None or time.time() - t0 > timeout:
                    raise DeployError(f"the SuperLink did not start: {self.log_tail('superlink')}") from None
                time.sleep(0.3)
        self.superlink = f"127.0.0.1:{port}"

    def start_node(self, i: int, state_dir: str, data: str = ""):
        """SuperNode i (client i of the data), keeping its state in state_dir. Secure: with TLS, trusting
        the CA only, and authenticated by a key of its own under `work`, registered the first time (a
        restarted node keeps its key, and so its registration and node id)."""
        name = f"node{i}"
        if self.insecure:
            security = ["--insecure"]
        else:
            key = os.path.join(self.work, "keys", name)
            if not os.path.exists(key):
                self.register(write_node_key(key))
            security = ["--root-certificates", self.ca, "--auth-supernode-private-key", key]
        config = f'partition-id={i} state-dir="{state_dir}"' + (f' data="{data}"' if data else "")
        self.start(name, ["flower-supernode", *security, "--superlink", self.superlink,
                          "--port", str(free_port()), "--node-config", config],
                   OMP_NUM_THREADS=str(self.threads))  # its ClientApps inherit it

    def register(self, public_key: str):
        """Register a node's public key with the SuperLink (`flwr supernode register`): with SuperNode
        authentication, the node holding its private key may then connect, and no other."""
        r = subprocess.run(["flwr", "supernode", "register", public_key, "feddpa", "--format", "json"],
                           env=self.cli_env(), capture_output=True, text=True)
        try:
            answer = json.loads(r.stdout)
        except json.JSONDecodeError:
            answer = {"error-message": (r.stdout + r.stderr).strip() or f"exit {r.returncode}"}
        if not answer.get("success"):
            why = answer.get("error-message", "").strip().splitlines()[-1:] or ["no reason given"]
            raise DeployError(f"the SuperLink did not register {public_key}: {why[0]}")

    def cli_env(self) -> dict:
        """The environment of flwr's CLI: a FLWR_HOME whose config.toml names the SuperLink as `feddpa`,
        with how to reach it (TLS trusting `ca`, or insecure)."""
        env = self.env("cli")
        security = "insecure = true\n" if self.insecure else f'root-certificates = "{self.ca}"\n'
        with open(os.path.join(env["FLWR_HOME"], "config.toml"), "w") as f:
            f.write(f'[superlink]\ndefault = "feddpa"\n\n[superlink.feddpa]\naddress = "{self.superlink}"\n{security}')
        return env

    def stop(self, name: str, wait: float = 10.0, kill: bool = False):
        """Stop process `name` and everything it started: SIGTERM to their process groups (the SuperLink
        starts its executor in a session of its own), then SIGKILL to whatever is left; kill: SIGKILL
        at once, as a crash would (a ClientApp given SIGTERM finishes its message first)."""
        p = self.procs.pop(name, None)
        if p is None:
            return
        family = [p.pid, *descendants(p.pid)]
        groups = {p.pid}  # its own (start() makes each a session leader), which can outlive p
        for pid in family:
            try:
                groups.add(os.getpgid(pid))
            except ProcessLookupError:
                pass
        groups.discard(os.getpgrp())
        for sig in (signal.SIGKILL,) if kill else (signal.SIGTERM, signal.SIGKILL):
            for g in groups:
                try:
                    os.killpg(g, sig)
                except ProcessLookupError:
                    pass
            try:
                p.wait(wait)
            except subprocess.TimeoutExpired:
                pass
        for pid in family:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        p.wait()
        deadline = time.time() + wait  # until the groups' last members, which are not our children, are gone
        while time.time() < deadline and any(g in groups and state != "Z" for _, state, _, g in process_table()):
            time.sleep(0.05)

    def close(self):
        for name in list(self.procs):
            self.stop(name)

    def run_app(self, train_args: list, nodes: int, round_timeout: float, connect_timeout: float,
                out=sys.stdout, dp_seeded_noise: bool = False) -> None:
        """`flwr run` of the app with train.py's flags, its output streamed to `out`; raises DeployError
        with the ServerApp's error if the run did not complete."""
        env = self.cli_env()
        run_config = os.path.join(self.work, "run_config.toml")
        with open(run_config, "w") as f:  # JSON strings are TOML basic strings
            f.write(f"train-args = {json.dumps(shlex.join(train_args))}\nnodes = {nodes}\n"
                    f"round-timeout = {float(round_timeout)}\nconnect-timeout = {float(connect_timeout)}\n"
                    f"dp-seeded-noise = {'true' if dp_seeded_noise else 'false'}\n")
        cli = subprocess.Popen(["flwr", "run", ROOT, "feddpa", "--stream", "--run-config", run_config], env=env,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
        self.procs["flwr-run"] = cli
        for line in cli.stdout:
            out.write(line)
            out.flush()
        cli.wait()
        self.procs.pop("flwr-run", None)
        status = self.status(env)
        if status.get("status") != "finished:completed":
            detail = status.get("status-details") or status.get("error-message") or f"flwr run exited {cli.returncode}"
            raise DeployError(f"the run ended {status.get('status', 'without a status')}: {detail}")

    def status(self, env: dict) -> dict:
        """The newest run's status on the SuperLink (`flwr ls`)."""
        ls = subprocess.run(["flwr", "ls", "feddpa", "--format", "json"], env=env, capture_output=True, text=True)
        try:
            listing = json.loads(ls.stdout)
        except json.JSONDecodeError:
            return {"error-message": (ls.stdout + ls.stderr).strip().splitlines()[-1:] or "flwr ls failed"}
        if not listing.get("success"):
            return {"error-message": listing.get("error-message", "flwr ls failed").strip()}
        return max(listing["runs"], key=lambda r: r["pending-at"], default={})


def absolute_paths(train_args: list) -> list:
    """train.py's path flags made absolute: the apps run in other folders."""
    out = list(train_args)
    for i, a in enumerate(out):
        flag, eq, value = a.partition("=")
        if flag in PATH_FLAGS and eq and value != "builtin":
            out[i] = f"{flag}={os.path.abspath(os.path.expanduser(value))}"
        elif a in PATH_FLAGS and i + 1 < len(out) and out[i + 1] != "builtin":
            out[i + 1] = os.path.abspath(os.path.expanduser(out[i + 1]))
    return out


def interrupted(signum, frame):
    raise KeyboardInterrupt


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0], epilog="every other flag goes to train.py's "
                                 "settings (python train.py --help)")
    ap.add_argument("--nodes", type=int, default=3, help="clients, one SuperNode each (default: 3)")
    ap.add_argument("--superlink", default="", help="HOST:PORT of a running SuperLink: start nothing, run the app there")
    ap.add_argument("--root-certificates", default="", help="with --superlink: the CA certificate of its TLS")
    ap.add_argument("--insecure", action="store_true", help="no TLS and no SuperNode authentication (local tests "
                    "only; default: the loopback deployment makes its own CA and node keys under --work)")
    ap.add_argument("--dp-seeded-noise", action="store_true", help="with --dp-clip: the server's DP noise from the run's "
                    "seed, so that a run can be replayed (default: the operating system's secure randomness)")
    ap.add_argument("--round-timeout", type=float, default=600.0, help="seconds a round waits for replies (default: 600)")
    ap.add_argument("--connect-timeout", type=float, default=120.0, help="seconds to wait for all nodes (default: 120)")
    ap.add_argument("--work", default="", help="folder for the processes' FLWR_HOMEs, logs and the nodes' state "
                                               "(default: a new temporary folder)")
    args, train_args = ap.parse_known_args(argv)
    import train  # the settings are checked here first, so a bad flag fails before any process starts
    from runs import UserError
    train_args = absolute_paths(train_args)
    try:
        cfg, _ = train.parse_args(train_args)
        train.check_config(cfg)
        if missing := missing_executable():
            raise UserError(f"flwr's {missing!r} is neither beside {sys.executable} nor on PATH: "
                            "pip install flwr==1.42.0 into this interpreter's environment")
        if args.nodes < 1:
            raise UserError(f"--nodes {args.nodes} must be >= 1")
        if args.root_certificates and not args.superlink:
            raise UserError("--root-certificates: only with --superlink (the loopback deployment makes its own CA)")
        if args.root_certificates and not os.path.isfile(args.root_certificates):
            raise UserError(f"--root-certificates {args.root_certificates}: no such file")
        if args.superlink and not (args.insecure or args.root_certificates):
            raise UserError("--superlink: give --root-certificates CA.pem (TLS) or --insecure (local tests only)")
        if args.superlink and (why := reachable(args.superlink)):
            raise UserError(f"no SuperLink reachable at {args.superlink} ({why})")
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    work = os.path.abspath(args.work or tempfile.mkdtemp(prefix="feddpa-flower-"))
    deployment = Deployment(work, args.nodes, insecure=args.insecure)
    signal.signal(signal.SIGTERM, interrupted)  # a kill of this command stops its processes too
    try:
        if args.superlink:
            deployment.superlink = args.superlink
            deployment.ca = os.path.abspath(args.root_certificates) if args.root_certificates else ""
        else:
            if cfg.model == "builtin":  # pretrain the built-in base once, before the nodes all want it
                train.base_and_tokenizer(cfg, train.choose_device(cfg.device), True)
            deployment.start_superlink()
            for i in range(args.nodes):
                deployment.start_node(i, os.path.join(work, f"state{i}"))
            security = "insecure" if args.insecure else f"TLS (CA {deployment.ca}) and registered node keys"
            print(f"Flower deployment in {work}: SuperLink {deployment.superlink}, {args.nodes} SuperNodes, {security}",
                  file=sys.stderr)
        deployment.run_app(train_args, args.nodes, args.round_timeout, args.connect_timeout,
                           dp_seeded_noise=args.dp_seeded_noise)
        return 0
    except DeployError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted; every process started here is stopped", file=sys.stderr)
        return 130
    finally:
        deployment.close()


if __name__ == "__main__":
    sys.exit(main())
