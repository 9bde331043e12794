"""The wrapper: the first code that runs as the program, and that decides what it reports
(kept as a source string; the launcher execs it).

WRAPPER_SRC has two modes. "program": read the nonce from the secret fd, execute main.py, write
"P <nonce>" only if it returned normally ("F {type, message}" otherwise); code in the program's
process could forge this by finding the wrapper's frame. "check": the tests never enter the
untrusted process. The wrapper makes itself non-dumpable (no ptrace, no /proc/<pid>/mem or fd
access by the same uid) and forks; the forked process drops the secret and result fds and runs
main.py (the solution), then answers calls of `entry point` over a socket with plain data only
(None, bool, int, float, complex, str, bytes, tuple, list, dict, set, frozenset). Only after the
fork does the wrapper read the nonce and the test source from the secret fd and run
`check(candidate)`, where `candidate` forwards each call. A traced, patched or introspected
solution process can only send wrong data; an object with a forged `__eq__` cannot cross.
"""

WRAPPER_SRC = r'''
import builtins, json, os, sys, traceback

# Big ints cross between the tests and the solution as JSON text.
getattr(sys, "set_int_max_str_digits", lambda n: None)(0)
write, exit_ = os.write, os._exit
MAX_MESSAGE = 64 << 20


def read_all(fd):
  data = b""
  while True:
    chunk = os.read(fd, 1 << 16)
    if not chunk:
      return data
    data += chunk


def flush():
  for s in (sys.stdout, sys.stderr):
    try:
      s.flush()
    except BaseException:
      pass


def fail(rfd, info):
  try:
    write(rfd, ("F " + json.dumps(info) + "\n").encode())
  except BaseException:
    pass
  flush()
  exit_(1)


def describe(exc, skip):
  """{type, message} of `exc`, after printing its traceback without the wrapper's `skip` frames."""
  info = {"type": type(exc).__name__, "message": ""}
  try:
    tb = exc.__traceback__
    for _ in range(skip):
      tb = tb.tb_next if tb is not None else None
    traceback.print_exception(type(exc), exc, tb)
    info["message"] = str(exc)[:500]
  except BaseException:
    pass
  return info


def run_main():
  sys.argv[:] = ["main.py"]
  with open("main.py", "rb") as f:
    code = compile(f.read(), "main.py", "exec")
  scope = {"__name__": "__main__", "__file__": os.path.abspath("main.py"),
           "__builtins__": builtins}
  exec(code, scope)
  return scope


def program(sfd, rfd):
  nonce = read_all(sfd).partition(b"\n")[0]
  os.close(sfd)
  os.set_inheritable(rfd, False)
  try:
    run_main()
  except BaseException as e:
    fail(rfd, describe(e, 2))
  flush()
  write(rfd, b"P " + nonce + b"\n")
  exit_(0)


# Values crossing between the processes: JSON, with one-key objects tagging what JSON lacks.
def enc(x):
  if x is None or x is True or x is False:
    return x
  for cls, conv in ((int, int), (float, float), (str, str.__str__)):
    if isinstance(x, cls):
      return conv(x)
  if isinstance(x, list):
    return [enc(v) for v in x]
  if isinstance(x, tuple):
    return {"t": [enc(v) for v in x]}
  if isinstance(x, dict):
    return {"d": [[enc(k), enc(v)] for k, v in x.items()]}
  if isinstance(x, (set, frozenset)):
    return {"f" if isinstance(x, frozenset) else "s": [enc(v) for v in x]}
  if isinstance(x, (bytes, bytearray)):
    return {"b": bytes(x).hex()}
  if isinstance(x, complex):
    return {"c": [x.real, x.imag]}
  raise TypeError(f"a {type(x).__name__} cannot be passed between the tests and the solution "
                  "(plain data only)")


def dec(y):
  if y is None or isinstance(y, (bool, int, float, str)):
    return y
  if isinstance(y, list):
    return [dec(v) for v in y]
  if isinstance(y, dict) and len(y) == 1:
    (tag, v), = y.items()
    if tag == "t":
      return tuple(dec(e) for e in v)
    if tag == "d":
      return {dec(k): dec(e) for k, e in v}
    if tag in ("s", "f"):
      return (set if tag == "s" else frozenset)(dec(e) for e in v)
    if tag == "b":
      return bytes.fromhex(v)
    if tag == "c":
      return complex(float(v[0]), float(v[1]))
  raise ValueError("malformed value from the solution process")


def send(sock, obj):
  data = json.dumps(obj).encode()
  sock.sendall(len(data).to_bytes(4, "big") + data)


def recv(sock):
  """The next message, or None at EOF."""
  def exact(n):
    buf = bytearray()
    while len(buf) < n:
      chunk = sock.recv(min(n - len(buf), 1 << 20))
      if not chunk:
        return None
      buf += chunk
    return bytes(buf)
  head = exact(4)
  if head is None:
    return None
  n = int.from_bytes(head, "big")
  if n > MAX_MESSAGE:
    raise ValueError(f"message of {n} bytes from the solution process")
  body = exact(n)
  return None if body is None else json.loads(body)


def serve(sock, entry):
  """The solution process: run main.py, then answer calls of `entry` with plain data."""
  try:
    fn = run_main()[entry]
  except BaseException as e:
    send(sock, ["error", describe(e, 2)])
    flush()
    exit_(1)
  send(sock, ["ready"])
  while True:
    msg = recv(sock)
    if msg is None:
      flush()
      exit_(0)
    try:
      reply = ["ok", enc(fn(*dec(msg[1]), **dec(msg[2])))]
    except BaseException as e:
      try:
        reply = ["raise", type(e).__name__, str(e)[:500]]
      except BaseException:
        reply = ["raise", "Exception", ""]
    flush()
    send(sock, reply)


class SolutionExited(Exception):
  pass


def rebuild(name, message):
  cls = getattr(builtins, name, None)
  if isinstance(cls, type) and issubclass(cls, BaseException):
    try:
      return cls(message)
    except BaseException:
      pass
  return RuntimeError(f"{name}: {message}")


def check_tests(sfd, rfd, entry):
  import ctypes, signal, socket
  libc = ctypes.CDLL(None, use_errno=True)
  libc.prctl.argtypes = [ctypes.c_int] + [ctypes.c_ulong] * 4
  if libc.prctl(4, 0, 0, 0, 0) != 0:  # PR_SET_DUMPABLE 0: the solution cannot ptrace us
    fail(rfd, {"type": "SandboxError", "message": "prctl(PR_SET_DUMPABLE) failed"})
  mine, theirs = socket.socketpair()
  pid = os.fork()
  if pid == 0:  # nothing secret has been read yet: this copy of the process holds no tests
    mine.close()
    os.close(sfd)
    os.close(rfd)
    libc.prctl(4, 1, 0, 0, 0)
    serve(theirs, entry)
  theirs.close()
  secret = read_all(sfd)
  os.close(sfd)
  os.set_inheritable(rfd, False)
  nonce, _, tests = secret.partition(b"\n")
  ended = []

  def exit_info():
    if not ended:
      _, status, usage = os.wait4(pid, 0)
      ended.append({"status": status, "cpu_s": usage.ru_utime + usage.ru_stime})
    return ended[0]

  def call(msg):
    if ended:
      raise SolutionExited("the solution process has exited")
    try:
      send(mine, msg)
      reply = recv(mine)
    except OSError:
      reply = None
    if reply is None:
      exit_info()
      raise SolutionExited("the solution process has exited")
    return reply

  def candidate(*args, **kwargs):
    reply = call(["call", enc(list(args)), enc(kwargs)])
    if reply[0] == "ok":
      return dec(reply[1])
    if reply[0] == "raise":
      raise rebuild(str(reply[1]), str(reply[2]))
    raise ValueError("malformed reply from the solution process")

  def finish_failed(info):
    if ended:
      info["exit"] = ended[0]
    try:
      os.kill(pid, signal.SIGKILL)
    except OSError:
      pass
    fail(rfd, info)

  try:
    hello = recv(mine)
    if hello is None:
      exit_info()
      raise SolutionExited("before the tests started")
    if hello[0] != "ready":
      err = dict(hello[1])
      finish_failed({"type": str(err.get("type")), "message": str(err.get("message"))})
  except BaseException as e:
    finish_failed({"type": type(e).__name__, "message": str(e)[:500]})
  try:
    scope = {"__name__": "__main__", "__builtins__": builtins}
    exec(compile(tests.decode("utf-8"), "test.py", "exec"), scope)
    scope[entry] = candidate
    scope["check"](candidate)
  except BaseException as e:
    finish_failed(describe(e, 1))
  if ended:  # the tests swallowed the exception of a call to a dead solution
    finish_failed({"type": "SolutionExited", "message": "during the tests"})
  os.kill(pid, signal.SIGKILL)
  flush()
  write(rfd, b"P " + nonce + b"\n")
  exit_(0)


def main():
  sfd, rfd, mode, entry = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4]
  if mode == "check":
    check_tests(sfd, rfd, entry)
  program(sfd, rfd)


main()
'''
