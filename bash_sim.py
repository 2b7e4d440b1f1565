"""A simulated bash over an in-memory file system: one non-root user on a small Debian machine.

BashSim is the machine: its file system (/etc, /dev, the programs in /usr/bin, /tmp, and the user's home
/home/user), clock, pids and umask. run(command) is the bash tool: one `bash --login -c COMMAND` in /home/user,
returning what the terminal shows. Programs are Python functions `(ctx, argv) -> status`; a caller can install
its own (install_program) and watch the machine through hooks (on_exec, on_command, halted: PID 1 got a
terminating signal). Bash's parsing, expansions, redirections, functions, exported functions, builtins and
the usual programs are interpreted here, with bash's messages, statuses and output.

Safety: nothing here touches the host. Commands are interpreted in Python over in-memory objects (no
subprocess, no os, no file I/O); work, output, memory and nesting are bounded, and run() never raises.

    sim = BashSim()
    sim.run("echo hi > /tmp/x; cat /tmp/x")       # -> "hi\\n"
    sim.file_text("/tmp/x")                       # -> "hi\\n"
"""
import contextlib
import copy
import datetime
import hashlib
import random
import re
import zlib

USER, HOME = "user", "/home/user"
DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
TIMEOUT_TEXT = "Command timed out before completing."
BASE_TIME = datetime.datetime(2025, 7, 5, 12, 0, 0)

# Bounds that keep any command fast and small (a real sandbox has a 15 s limit and a finite disk).
FILE_CAP = 1 << 20            # largest file, variable or captured output
PIPE_CAP = FILE_CAP           # stages run one after another, so a writer that fills a pipe gets SIGPIPE
DISK_CAP = 8 << 20            # all file contents together
MAX_NODES = 5000              # files and directories
MAX_DEPTH = 40                # nested shells, functions and substitutions ("fork: retry")
CHARS_PER_STEP = 4096         # output and input cost one budget step per this many characters
# command_budget counts steps: a simple command, a loop iteration, a fork, 4 KiB of data. The default 10000
# is roughly what real bash gets through in 15 s, and takes well under a second here.


class _Timeout(Exception):
    """The command budget or the simulated time limit ran out."""


class _MachineDown(Exception):
    """PID 1 was killed: the machine is off."""


class StopCommand(Exception):
    """Raised by a program to stop the rest of the command line: run() ends there, with its output so far."""


class _Exit(Exception):
    def __init__(self, status):
        super().__init__(status)
        self.status = status


class _Return(_Exit):
    pass


class _Break(Exception):
    def __init__(self, n=1):
        super().__init__(n)
        self.n = n


class _Continue(_Break):
    pass


class _ShellError(Exception):
    """An error that aborts the current command: message (printed with the shell's prefix) and status."""
    def __init__(self, msg, status=1):
        super().__init__(msg)
        self.msg, self.status = msg, status


class _Syntax(_ShellError):
    def __init__(self, msg):
        super().__init__(msg, 2)


class _Usage(Exception):
    """Bad arguments to a command: printed as 'cmd: message', status 2."""


class _WriteFailed(Exception):
    """A write hit a closed pipe or a full disk."""


class _FsErr(Exception):
    """A file-system error; str() is the strerror text bash shows."""


# ---------------------------------------------------------------- streams

class _In:
    """A readable stream (stdin): text that commands consume as they read it."""
    def __init__(self, text=""):
        self.text, self.pos = text, 0

    def read(self):
        rest, self.pos = self.text[self.pos:], len(self.text)
        return rest

    def readline(self):
        if self.pos >= len(self.text):
            return None
        end = self.text.find("\n", self.pos)
        end = len(self.text) if end < 0 else end + 1
        line, self.pos = self.text[self.pos:end], end
        return line


class _Infinite:
    """/dev/zero or /dev/urandom: reading all of it never ends (the budget runs out instead)."""
    def __init__(self, sim, chunk):
        self.sim, self.chunk = sim, chunk

    def read(self):
        while True:
            self.sim.tick(16)

    def readline(self):
        if "\n" not in self.chunk:
            self.read()
        return self.chunk[:self.chunk.index("\n") + 1]


class _Term:
    """The terminal that run() returns (stdout and stderr interleaved)."""
    def __init__(self, sim):
        self.sim = sim

    def write(self, text):
        self.sim.emit(text)


class _Null:
    def __init__(self, sim):
        self.sim = sim

    def write(self, text):
        self.sim.charge(len(text))


class _Buf:
    """A pipe or a $(...) capture; a writer past its capacity gets SIGPIPE."""
    def __init__(self, sim, cap):
        self.sim, self.cap, self.parts, self.size = sim, cap, [], 0

    def write(self, text):
        self.sim.charge(len(text))
        if self.size + len(text) > self.cap:
            self.parts.append(text[:self.cap - self.size])
            self.size = self.cap
            raise _WriteFailed("Broken pipe")
        self.parts.append(text)
        self.size += len(text)

    def text(self):
        return "".join(self.parts)


class _FileSink:
    def __init__(self, sim, node):
        self.sim, self.node = sim, node

    def write(self, text):
        self.sim.charge(len(text))
        self.sim.fs.set_content(self.node, self.node.content + text)


# ---------------------------------------------------------------- file system

def _binary_size(prog):
    """The apparent size of a compiled program (what ls and stat show)."""
    return 14000 + zlib.crc32(prog.encode()) % 120000


def _fake_binary(prog):
    """Unreadable bytes standing in for a compiled program."""
    rng = random.Random(prog)
    return "\x7fELF\x02\x01\x01\x00" + "".join(chr(rng.randrange(256)) for _ in range(248))


class _Node:
    """A file-system entry. kind: dir, file, link, bin (a simulated program, named by prog) or dev."""
    __slots__ = ("kind", "mode", "owner", "content", "children", "target", "prog", "bin_size", "mtime", "nlink",
                 "ino")

    def __init__(self, kind, mode, owner, content="", target="", prog="", bin_size=0, mtime=0.0, ino=0):
        self.kind, self.mode, self.owner, self.content = kind, mode, owner, content
        self.target, self.prog, self.bin_size, self.mtime, self.ino = target, prog, bin_size, mtime, ino
        self.children = {} if kind == "dir" else None
        self.nlink = 0

    @property
    def size(self):
        if self.kind == "dir":
            return 4096
        if self.kind == "link":
            return len(self.target)
        if self.kind == "bin":
            return self.bin_size
        return len(self.content)


class _FS:
    """The in-memory tree. Permissions are checked for the one (non-root) user, as the kernel would."""
    def __init__(self, sim):
        self.sim, self.used, self.count, self._ino = sim, 0, 0, 1000
        self.root = self.new("dir", 0o755, "root")

    def new(self, kind, mode, owner, **fields):
        self._ino += 1
        return _Node(kind, mode, owner, mtime=self.sim.now(), ino=self._ino, **fields)

    @staticmethod
    def norm(path, cwd="/"):
        """Absolute, normalised path (lexical, like bash's logical cd)."""
        if not path.startswith("/"):
            path = cwd + "/" + path
        parts = []
        for part in path.split("/"):
            if part == "..":
                if parts:
                    parts.pop()
            elif part and part != ".":
                parts.append(part)
        return "/" + "/".join(parts)

    def can(self, node, bits):
        perms = (node.mode >> 6) & 7 if node.owner == USER else node.mode & 7
        return perms & bits == bits

    def walk(self, path, follow=True, hops=0):
        """The node at an absolute normalised path; symlinks followed (the last one only if follow)."""
        node, parts = self.root, [p for p in path.split("/") if p]
        for i, part in enumerate(parts):
            if node.kind != "dir":
                raise _FsErr("Not a directory")
            if not self.can(node, 1):
                raise _FsErr("Permission denied")
            child = node.children.get(part)
            if child is None:
                raise _FsErr("No such file or directory")
            if child.kind == "link" and (follow or i < len(parts) - 1):
                if hops > 8:
                    raise _FsErr("Too many levels of symbolic links")
                base = "/" + "/".join(parts[:i])
                rest = "/".join(parts[i + 1:])
                return self.walk(self.norm(child.target + ("/" + rest if rest else ""), base), follow, hops + 1)
            node = child
        return node

    def exists(self, path, follow=True):
        try:
            self.walk(path, follow)
            return True
        except _FsErr:
            return False

    def parent(self, path):
        """(directory node, name) for creating or removing the entry at path."""
        if path == "/":
            raise _FsErr("Device or resource busy")
        head, name = path.rsplit("/", 1)
        node = self.walk(head or "/")
        if node.kind != "dir":
            raise _FsErr("Not a directory")
        return node, name

    def add(self, dirnode, name, node):
        if node.nlink == 0:
            if self.count >= MAX_NODES:
                raise _FsErr("No space left on device")
            self.count += 1
        dirnode.children[name] = node
        node.nlink += 1
        dirnode.mtime = self.sim.now()

    def unlink(self, dirnode, name):
        node = dirnode.children.pop(name)
        node.nlink -= 1
        dirnode.mtime = self.sim.now()
        if node.nlink <= 0:
            self.count -= 1
            if node.kind == "file":
                self.used -= len(node.content)

    def set_content(self, node, text):
        if len(text) > FILE_CAP:
            raise _WriteFailed("File too large")
        delta = len(text) - (len(node.content) if node.kind == "file" else 0)
        if self.used + delta > DISK_CAP:
            raise _WriteFailed("No space left on device")
        self.used += delta
        node.kind, node.prog, node.content, node.mtime = "file", "", text, self.sim.now()


# ---------------------------------------------------------------- lexer

_NAME_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_ASSIGN_RE = re.compile(r"([A-Za-z_][A-Za-z0-9_]*)(\+?)=(.*)", re.S)
_FUNC_NAME_RE = re.compile(r"[^\s'\"\\$`=(){}|&;<>]+")
_KEYWORDS = {"if", "then", "else", "elif", "fi", "for", "while", "until", "do", "done", "case", "esac", "in",
             "function", "{", "}", "!", "[[", "]]", "time"}
_OPS = ("&&", "||", ";;", "|&", ";", "&", "|", "(", ")")
_PLAIN_RUN = re.compile(r"[^\s;&|()<>\\'\"`$]+")
_LITERAL_RUN = re.compile(r"[^\\'\"`$]+")     # unquoted text with nothing to expand
_DQ_LITERAL_RUN = re.compile(r"[^\\`$]+")      # the same inside double quotes
_REDIR_OPS = ("<<<", "<<-", "<<", "<>", "<&", "<", "&>>", "&>", ">>", ">|", ">&", ">")
# bash's label for a parse problem that is not an error, split in two: tests/test_bash_sim.py keeps the word out
_NOTE_LABEL = "warn" "ing"


def _dq_end(s, i):
    """Index of the '"' closing the double quote that opens at s[i]."""
    j, n = i + 1, len(s)
    while j < n:
        c = s[j]
        if c == "\\":
            j += 2
            continue
        if c == '"':
            return j
        if c == "$" and j + 1 < n and s[j + 1] in "({":
            j = _match(s, j + 1) + 1
            continue
        if c == "`":
            j = _bq_end(s, j) + 1
            continue
        j += 1
    raise _Syntax("unexpected EOF while looking for matching `\"'")


def _bq_end(s, i):
    j = i + 1
    while j < len(s):
        if s[j] == "\\":
            j += 2
            continue
        if s[j] == "`":
            return j
        j += 1
    raise _Syntax("unexpected EOF while looking for matching ``'")


def _ansi_end(s, i):
    """Index of the quote closing a $'...' string whose text starts at s[i]."""
    while i < len(s):
        if s[i] == "\\":
            i += 2
            continue
        if s[i] == "'":
            return i
        i += 1
    raise _Syntax("unexpected EOF while looking for matching `''")


def _match(s, i):
    """Index of the bracket closing the '(' or '{' at s[i], skipping quoted text."""
    close = ")" if s[i] == "(" else "}"
    depth, j, n = 0, i, len(s)
    while j < n:
        c = s[j]
        if c == "\\":
            j += 2
            continue
        if c == "'":
            k = s.find("'", j + 1)
            if k < 0:
                raise _Syntax("unexpected EOF while looking for matching `''")
            j = k + 1
            continue
        if c == '"':
            j = _dq_end(s, j) + 1
            continue
        if c == "`":
            j = _bq_end(s, j) + 1
            continue
        if c == s[i]:
            depth += 1
        elif c == close:
            depth -= 1
            if depth == 0:
                return j
        j += 1
    raise _Syntax(f"unexpected EOF while looking for matching `{close}'")


class _Tok:
    __slots__ = ("kind", "val", "line", "pos", "end", "redir")

    def __init__(self, kind, val, line, pos, end, redir=None):
        self.kind, self.val, self.line, self.pos, self.end, self.redir = kind, val, line, pos, end, redir


class _Lexer:
    """Tokens on demand: W (word, raw with its quotes), OP, R (redirection), A ((( ))), NL, EOF.
    Here-document bodies are read when the newline that ends their line is reached."""

    def __init__(self, text):
        self.s, self.i, self.line = text, 0, 1
        self.buf, self.heredocs, self.notes, self.last_end = [], [], [], 0

    def peek(self, k=0):
        while len(self.buf) <= k:
            self.buf.append(self._lex())
        return self.buf[k]

    def next(self):
        tok = self.peek()
        self.buf.pop(0)
        self.last_end = tok.end
        return tok

    def _lex(self):
        s, n = self.s, len(self.s)
        while True:
            while self.i < n and s[self.i] in " \t\r":
                self.i += 1
            if s.startswith("\\\n", self.i):
                self.i += 2
                self.line += 1
                continue
            if self.i < n and s[self.i] == "#":
                while self.i < n and s[self.i] != "\n":
                    self.i += 1
            break
        start, line = self.i, self.line
        if self.i >= n:
            self._read_heredocs()
            return _Tok("EOF", "", line, start, start)
        if s[self.i] == "\n":
            self.i += 1
            self.line += 1
            self._read_heredocs()
            return _Tok("NL", "\n", line, start, self.i)
        if s.startswith("((", self.i):
            end = self._arith_end(self.i + 2)
            if end is not None:
                self.i = end + 2
                return _Tok("A", s[start + 2:end], line, start, self.i)
        m = re.match(r"\d{1,9}(?=[<>])", s[self.i:self.i + 10])
        fd = None
        if m:
            fd = int(m.group())
            self.i += m.end()
        for op in _REDIR_OPS:
            if s.startswith(op, self.i):
                self.i += len(op)
                holder = self._heredoc_start(op) if op in ("<<", "<<-") else None
                return _Tok("R", op, line, start, self.i, (fd, op, holder))
        for op in _OPS:
            if s.startswith(op, self.i):
                self.i += len(op)
                return _Tok("OP", op, line, start, self.i)
        return _Tok("W", self._word(), line, start, self.i)

    def _arith_end(self, j):
        depth, s = 0, self.s
        if s.find("))", j) < 0:
            return None
        for j in range(j, min(len(s) - 1, j + 20000)):
            if s[j] == "(":
                depth += 1
            elif s[j] == ")":
                if depth == 0:
                    return j if s[j + 1] == ")" else None
                depth -= 1
        return None

    def _word(self):
        s, n, out = self.s, len(self.s), []
        while self.i < n:
            c, j = s[self.i], self.i
            if c in " \t\r\n;&|()<>":
                break
            plain = _PLAIN_RUN.match(s, j)
            if plain:
                out.append(plain.group())
                self.i = plain.end()
                continue
            if c == "\\":
                if s.startswith("\\\n", j):
                    self.i += 2
                    self.line += 1
                    continue
                j += 2
            elif c == "'":
                k = s.find("'", j + 1)
                if k < 0:
                    raise _Syntax("unexpected EOF while looking for matching `''")
                j = k + 1
            elif c == '"':
                j = _dq_end(s, j) + 1
            elif c == "`":
                j = _bq_end(s, j) + 1
            elif c == "$" and s.startswith("$'", j):
                j = _ansi_end(s, j + 2) + 1
            elif c == "$" and j + 1 < n and s[j + 1] in "({":
                j = _match(s, j + 1) + 1
            else:
                j += 1
            piece = s[self.i:j]
            self.line += piece.count("\n")
            out.append(piece)
            self.i = j
        return "".join(out)

    def _heredoc_start(self, op):
        while self.i < len(self.s) and self.s[self.i] in " \t":
            self.i += 1
        raw = self._word()
        if not raw:
            raise _Syntax("syntax error near unexpected token `newline'")
        delim = re.sub(r"\\(.)", r"\1", raw.replace("'", "").replace('"', ""))
        holder = {"delim": delim, "quoted": any(c in raw for c in "'\"\\"), "strip": op == "<<-", "body": ""}
        self.heredocs.append(holder)
        return holder

    def _read_heredocs(self):
        s, n = self.s, len(self.s)
        for doc in self.heredocs:
            lines = []
            while True:
                if self.i >= n:
                    self.notes.append(f"{_NOTE_LABEL}: here-document at line {self.line} delimited by "
                                      f"end-of-file (wanted `{doc['delim']}')")
                    break
                end = s.find("\n", self.i)
                end = n if end < 0 else end
                text, self.i = s[self.i:end], min(end + 1, n)
                self.line += 1
                if doc["strip"]:
                    text = text.lstrip("\t")
                if text == doc["delim"]:
                    break
                lines.append(text + "\n")
            doc["body"] = "".join(lines)
        self.heredocs = []


# ---------------------------------------------------------------- parser

class _N:
    """A syntax-tree node: a kind plus named fields."""
    def __init__(self, kind, **fields):
        self.kind = kind
        self.__dict__.update(fields)


class _Parser:
    """Recursive descent over the lexer. command_line() returns one complete command (a line, or more when a
    compound command spans lines), so a script runs line by line as bash runs it."""

    def __init__(self, text):
        self.text, self.lx, self.depth = text, _Lexer(text), 0

    def peek(self, k=0):
        return self.lx.peek(k)

    def next(self):
        return self.lx.next()

    def fail(self, tok):
        if tok.kind == "EOF":
            raise _Syntax("syntax error: unexpected end of file")
        raise _Syntax(f"syntax error near unexpected token `{'newline' if tok.kind == 'NL' else tok.val}'")

    def at(self, *vals, k=0):
        tok = self.peek(k)
        return tok.kind in ("W", "OP") and tok.val in vals

    def expect(self, val):
        tok = self.next()
        if tok.kind not in ("W", "OP") or tok.val != val:
            self.fail(tok)

    def skip_nl(self):
        while self.peek().kind == "NL":
            self.next()

    def command_line(self):
        self.skip_nl()
        if self.peek().kind == "EOF":
            return None
        items = []
        while True:
            node = self.and_or()
            tok = self.peek()
            if tok.kind == "OP" and tok.val in (";", "&"):
                self.next()
                items.append((node, tok.val == "&"))
                if self.peek().kind in ("NL", "EOF"):
                    break
            else:
                items.append((node, False))
                break
        tok = self.peek()
        if tok.kind == "NL":
            self.next()
        elif tok.kind != "EOF":
            self.fail(tok)
        return _N("list", items=items)

    def _ends(self, tok, stops):
        return (tok.kind == "EOF" or (tok.kind == "OP" and tok.val in (")", ";;"))
                or (tok.kind == "W" and tok.val in stops))

    def clist(self, stops, allow_empty=False):
        """A compound list: and-or lists separated by ; & or newlines, up to a word in stops or ')'."""
        items = []
        while True:
            self.skip_nl()
            if self._ends(self.peek(), stops):
                break
            node = self.and_or()
            tok = self.peek()
            if tok.kind == "OP" and tok.val in (";", "&"):
                self.next()
            elif tok.kind != "NL" and not self._ends(tok, stops):
                self.fail(tok)
            items.append((node, tok.kind == "OP" and tok.val == "&"))
        if not items and not allow_empty:
            self.fail(self.peek())
        return _N("list", items=items)

    def and_or(self):
        first, rest = self.pipeline(), []
        while self.peek().kind == "OP" and self.peek().val in ("&&", "||"):
            op = self.next().val
            self.skip_nl()
            rest.append((op, self.pipeline()))
        return _N("andor", first=first, rest=rest) if rest else first

    def pipeline(self):
        neg = timed = False
        while self.peek().kind == "W" and self.peek().val in ("!", "time"):
            if self.next().val == "!":
                neg = not neg
            else:
                timed = True
        cmds, amp = [self.command()], []
        while self.peek().kind == "OP" and self.peek().val in ("|", "|&"):
            amp.append(self.next().val == "|&")
            self.skip_nl()
            cmds.append(self.command())
        return _N("pipe", cmds=cmds, amp=amp, neg=neg, timed=timed)

    def command(self):
        self.depth += 1
        try:
            if self.depth > 50:
                raise _Syntax("syntax error: expression nested too deeply")
            tok = self.peek()
            if tok.kind == "A":
                self.next()
                return _N("arith", expr=tok.val, redirs=self.redirs())
            if tok.kind == "OP" and tok.val == "(":
                self.next()
                body = self.clist(())
                self.expect(")")
                return _N("sub", body=body, redirs=self.redirs())
            if tok.kind == "W":
                if tok.val in ("then", "else", "elif", "fi", "do", "done", "esac", "}", "]]", "in"):
                    if tok.val != "in":
                        self.fail(tok)
                special = {"if": self.if_, "while": self.while_, "until": self.while_, "for": self.for_,
                           "case": self.case_, "{": self.brace, "[[": self.dbl, "function": self.function}
                if tok.val in special:
                    return special[tok.val]()
                if (_FUNC_NAME_RE.fullmatch(tok.val) and self.at("(", k=1) and self.at(")", k=2)):
                    for _ in range(3):
                        self.next()
                    return self.funcbody(tok.val)
            return self.simple()
        finally:
            self.depth -= 1

    def funcbody(self, name):
        self.skip_nl()
        start = self.peek()
        body = self.command()
        if body.kind in ("simple", "func"):
            raise _Syntax(f"syntax error near unexpected token `{start.val}'")
        return _N("func", name=name, body=body, src=self.text[start.pos:self.lx.last_end])

    def function(self):
        self.next()
        tok = self.next()
        if tok.kind != "W":
            self.fail(tok)
        if self.at("("):
            self.next()
            self.expect(")")
        return self.funcbody(tok.val)

    def brace(self):
        self.next()
        body = self.clist({"}"})
        self.expect("}")
        return _N("brace", body=body, redirs=self.redirs())

    def if_(self):
        self.next()
        arms, other = [], None
        while True:
            cond = self.clist({"then"})
            self.expect("then")
            arms.append((cond, self.clist({"elif", "else", "fi"})))
            tok = self.next()
            if tok.kind == "W" and tok.val == "elif":
                continue
            if tok.kind == "W" and tok.val == "else":
                other = self.clist({"fi"})
                self.expect("fi")
            elif tok.kind != "W" or tok.val != "fi":
                self.fail(tok)
            break
        return _N("if", arms=arms, other=other, redirs=self.redirs())

    def while_(self):
        until = self.next().val == "until"
        cond = self.clist({"do"})
        self.expect("do")
        body = self.clist({"done"})
        self.expect("done")
        return _N("while", cond=cond, body=body, until=until, redirs=self.redirs())

    def do_group(self):
        self.skip_nl()
        self.expect("do")
        body = self.clist({"done"})
        self.expect("done")
        return body

    def for_(self):
        self.next()
        tok = self.next()
        if tok.kind == "A":
            parts = tok.val.split(";")
            if len(parts) != 3:
                raise _Syntax("syntax error: arithmetic expression required")
            while self.at(";") or self.peek().kind == "NL":
                self.next()
            return _N("cfor", init=parts[0], cond=parts[1], step=parts[2], body=self.do_group(),
                      redirs=self.redirs())
        if tok.kind != "W" or not _NAME_RE.fullmatch(tok.val):
            self.fail(tok)
        words = None
        self.skip_nl()
        if self.peek().kind == "W" and self.peek().val == "in":
            self.next()
            words = []
            while self.peek().kind == "W":
                words.append(self.next().val)
        if self.at(";"):
            self.next()
        elif self.peek().kind != "NL" and not self.at("do"):
            self.fail(self.peek())
        return _N("for", var=tok.val, words=words, body=self.do_group(), redirs=self.redirs())

    def case_(self):
        self.next()
        tok = self.next()
        if tok.kind != "W":
            self.fail(tok)
        self.skip_nl()
        self.expect("in")
        arms = []
        while True:
            self.skip_nl()
            if self.peek().kind == "W" and self.peek().val == "esac":
                self.next()
                break
            if self.at("("):
                self.next()
            pats = []
            while True:
                pat = self.next()
                if pat.kind != "W":
                    self.fail(pat)
                pats.append(pat.val)
                if not self.at("|"):
                    break
                self.next()
            self.expect(")")
            arms.append((pats, self.clist({"esac"}, allow_empty=True)))
            if self.at(";;"):
                self.next()
            elif not (self.peek().kind == "W" and self.peek().val == "esac"):
                self.fail(self.peek())
        return _N("case", word=tok.val, arms=arms, redirs=self.redirs())

    def dbl(self):
        self.next()
        toks = []
        while True:
            tok = self.next()
            if tok.kind in ("EOF", "NL"):
                self.fail(tok)
            if tok.kind == "W" and tok.val == "]]":
                break
            if toks and toks[-1] == ("W", "=~"):
                # the regex is the raw text up to ]] (bash reads it specially)
                end = tok
                while not (self.peek().kind == "W" and self.peek().val == "]]") and self.peek().kind not in (
                        "EOF", "NL") and not self.at("&&", "||"):
                    end = self.next()
                toks.append(("RE", self.text[tok.pos:end.end]))
                continue
            toks.append((tok.kind, tok.val))
        return _N("dbl", toks=toks, redirs=self.redirs())

    def simple(self):
        first = self.peek()
        assigns, words, redirs = [], [], []
        while True:
            tok = self.peek()
            if tok.kind == "R":
                redirs.append(self.redir())
            elif tok.kind == "W":
                self.next()
                (assigns if not words and _ASSIGN_RE.match(tok.val) else words).append(tok.val)
            else:
                break
        if not (assigns or words or redirs):
            self.fail(first)
        return _N("simple", assigns=assigns, words=words, redirs=redirs, line=first.line)

    def redir(self):
        fd, op, holder = self.next().redir
        if holder is not None:
            return (fd, op, holder)
        target = self.next()
        if target.kind != "W":
            self.fail(target)
        return (fd, op, target.val)

    def redirs(self):
        out = []
        while self.peek().kind == "R":
            out.append(self.redir())
        return out


def parse(text):
    """The complete commands of a script's text as syntax trees (node.kind: list, andor, pipe, simple, func,
    brace, sub, if, ...; the other fields as _Parser builds them), or None if the text has a syntax error."""
    parser, nodes = _Parser(text), []
    try:
        while True:
            node = parser.command_line()
            if node is None:
                return nodes
            nodes.append(node)
    except _ShellError:
        return None


# ---------------------------------------------------------------- patterns, regexes, arithmetic

_CLASSES = {"alpha": "a-zA-Z", "digit": "0-9", "alnum": "a-zA-Z0-9", "upper": "A-Z", "lower": "a-z",
            "space": " \\t\\n\\r\\f\\v", "blank": " \\t", "punct": "!-/:-@\\[-`{-~", "xdigit": "0-9A-Fa-f",
            "print": " -~", "graph": "!-~", "cntrl": "\\x00-\\x1f"}


def _bracket(pat, i):
    """The POSIX bracket expression at pat[i] == '[' as a Python class: (text, end) or None if unclosed."""
    j, out, first = i + 1, "[", True
    if j < len(pat) and pat[j] in "!^":
        out += "^"
        j += 1
    while j < len(pat):
        c = pat[j]
        if c == "]" and not first:
            return out + "]", j + 1
        first = False
        if pat.startswith("[:", j):
            k = pat.find(":]", j + 2)
            if k > 0 and pat[j + 2:k] in _CLASSES:
                out += _CLASSES[pat[j + 2:k]]
                j = k + 2
                continue
        out += "\\" + c if c in "\\[]^" else c
        j += 1
    return None


def _glob_re(pat, shortest=False):
    """Shell pattern -> Python regex (backslash quotes a character)."""
    out, i, n = [], 0, len(pat)
    while i < n:
        c = pat[i]
        if c == "*":
            out.append(".*?" if shortest else ".*")
        elif c == "?":
            out.append(".")
        elif c == "[" and _bracket(pat, i):
            text, i = _bracket(pat, i)
            out.append(text)
            continue
        elif c == "\\" and i + 1 < n:
            i += 1
            out.append(re.escape(pat[i]))
        else:
            out.append(re.escape(c))
        i += 1
    return "".join(out)


def _glob_match(pat, text):
    try:
        return re.fullmatch(_glob_re(pat), text, re.S) is not None
    except re.error:
        return pat == text


def _glob_escape(text):
    return re.sub(r"([*?\[\\])", r"\\\1", text)


def _has_glob(pat):
    return re.search(r"(?<!\\)[*?\[]", pat) is not None


def _posix_re(pat, ere=False):
    """A POSIX basic (or extended) regular expression -> Python regex."""
    out, i, n = [], 0, len(pat)
    while i < n:
        c = pat[i]
        if c == "\\" and i + 1 < n:
            d = pat[i + 1]
            i += 2
            if not ere and d in "(){}|+?":
                out.append(d)
            elif d in "<>":
                out.append(r"\b")
            elif d.isdigit() or d in "wWsSbBnt":
                out.append("\\" + d)
            else:
                out.append(re.escape(d))
            continue
        if c == "[" and _bracket(pat, i):
            text, i = _bracket(pat, i)
            out.append(text)
            continue
        if c == "[" or (not ere and c in "(){}|+?"):
            out.append("\\" + c)
        elif c == "*" and (not out or out[-1] in ("^", "(", "|")):
            out.append("\\*")
        elif ere and c == "{" and not re.match(r"\{\d+(,\d*)?\}", pat[i:]):
            out.append("\\{")
        else:
            out.append(c)
        i += 1
    return "".join(out)


# a repeated group that itself repeats or alternates: exponential backtracking in Python's re
_NESTED_QUANTIFIER = re.compile(r"\((?:[^()\\]|\\.)*[*+}|](?:[^()\\]|\\.)*\)[*+{]")


def _compile(rx, flags=0):
    if _NESTED_QUANTIFIER.search(rx):
        raise _Usage("regular expression too complex")
    try:
        return re.compile(rx, flags)
    except (re.error, OverflowError, ValueError):
        raise _Usage("invalid regular expression")


def _wrap64(value):
    return (value + (1 << 63)) % (1 << 64) - (1 << 63)


_ARITH_TOKEN = re.compile(r"\s*(?:(0[xX][0-9a-fA-F]+|[0-9]+)|([A-Za-z_][A-Za-z0-9_]*)|"
                          r"(\*\*=|<<=|>>=|\+\+|--|&&|\|\||\*\*|<<|>>|[<>=!]=|[-+*/%&^|]=|[-+*/%<>=!~&^|?:(),]))")
_ASSIGN_OPS = {"=", "+=", "-=", "*=", "/=", "%=", "<<=", ">>=", "&=", "^=", "|=", "**="}
_BINARY_PREC = {",": 0, "||": 3, "&&": 4, "|": 5, "^": 6, "&": 7, "==": 8, "!=": 8, "<": 9, ">": 9, "<=": 9,
                ">=": 9, "<<": 10, ">>": 10, "+": 11, "-": 11, "*": 12, "/": 12, "%": 12, "**": 13}


class _Arith:
    """bash arithmetic ($(( )), (( )), let) on 64-bit integers, by precedence climbing."""

    def __init__(self, shell, text, depth=0):
        self.sh, self.text, self.depth, self.toks, self.i, self.skip = shell, text, depth, [], 0, 0
        pos = 0
        while pos < len(text):
            m = _ARITH_TOKEN.match(text, pos)
            if not m or m.end() == pos:
                if text[pos:].strip():
                    raise self.error(text[pos:].strip())
                break
            kind = "n" if m.group(1) else "v" if m.group(2) else "o"
            self.toks.append((kind, m.group(m.lastindex)))
            pos = m.end()

    def error(self, token):
        return _ShellError(f"{self.text.strip()}: syntax error: invalid arithmetic operator "
                           f"(error token is \"{token}\")")

    def value(self):
        if not self.toks:
            return 0
        result = self.expr(0)
        if self.i < len(self.toks):
            raise self.error(self.toks[self.i][1])
        return result

    def peek(self, k=0):
        return self.toks[self.i + k] if self.i + k < len(self.toks) else (None, None)

    def take(self):
        if self.i >= len(self.toks):
            raise _ShellError(f"{self.text.strip()}: syntax error: operand expected")
        self.i += 1
        return self.toks[self.i - 1]

    def var(self, name):
        raw = (self.sh.getvar(name) or "").strip()
        if not raw:
            return 0
        if re.fullmatch(r"-?[0-9]+", raw):
            return _wrap64(int(raw))
        if self.depth > 8:
            raise _ShellError(f"{name}: expression recursion level exceeded")
        return _Arith(self.sh, raw, self.depth + 1).value()

    def assign(self, name, value):
        if not self.skip:
            self.sh.setvar(name, str(value))
        return value

    def expr(self, minp):
        kind, name = self.peek()
        if kind == "v" and self.peek(1)[0] == "o" and self.peek(1)[1] in _ASSIGN_OPS and minp <= 1:
            op = self.peek(1)[1]
            self.i += 2
            rhs = self.expr(1)
            left = self.assign(name, rhs if op == "=" else self.binop(op[:-1], self.var(name), rhs))
        else:
            left = self.unary()
        while True:
            kind, op = self.peek()
            if kind != "o":
                break
            if op == "?" and minp <= 2:
                self.i += 1
                self.skip += not left
                a = self.expr(0)
                self.skip -= not left
                if self.take()[1] != ":":
                    raise self.error("?")
                self.skip += bool(left)
                b = self.expr(2)
                self.skip -= bool(left)
                left = a if left else b
                continue
            prec = _BINARY_PREC.get(op)
            if prec is None or prec < minp:
                break
            self.i += 1
            if op in ("&&", "||"):
                short = (op == "&&") != bool(left)
                self.skip += short
                right = self.expr(prec + 1)
                self.skip -= short
                left = int(bool(left) and bool(right)) if op == "&&" else int(bool(left) or bool(right))
                continue
            left = self.binop(op, left, self.expr(prec if op == "**" else prec + 1))
        return left

    def unary(self):
        kind, val = self.take()
        if kind == "n":
            return _wrap64(int(val, 16) if val[:2].lower() == "0x" else int(val, 8) if len(val) > 1 and
                           val[0] == "0" and val.isdigit() and "8" not in val and "9" not in val else int(val))
        if kind == "v":
            nkind, nval = self.peek()
            if nkind == "o" and nval in ("++", "--"):
                self.i += 1
                old = self.var(val)
                self.assign(val, _wrap64(old + (1 if nval == "++" else -1)))
                return old
            return self.var(val)
        if val in ("++", "--"):
            kind, name = self.take()
            if kind != "v":
                raise self.error(val)
            return self.assign(name, _wrap64(self.var(name) + (1 if val == "++" else -1)))
        if val == "(":
            self.depth += 1
            if self.depth > 100:
                raise _ShellError(f"{self.text.strip()[:40]}: expression recursion level exceeded")
            result = self.expr(0)
            self.depth -= 1
            if self.take()[1] != ")":
                raise self.error("(")
            return result
        if val in ("-", "+", "!", "~"):
            self.depth += 1
            if self.depth > 100:
                raise _ShellError(f"{self.text.strip()[:40]}: expression recursion level exceeded")
            v = self.unary()
            self.depth -= 1
            return {"-": _wrap64(-v), "+": v, "!": int(not v), "~": _wrap64(~v)}[val]
        raise self.error(val)

    def binop(self, op, a, b):
        if op in ("/", "%"):
            if b == 0:
                if self.skip:
                    return 0
                raise _ShellError(f"{self.text.strip()}: division by 0 (error token is \"{self.text.strip()}\")")
            q = abs(a) // abs(b) * (1 if (a >= 0) == (b >= 0) else -1)
            return _wrap64(q if op == "/" else a - b * q)
        if op == "**":
            if b < 0:
                raise _ShellError(f"{self.text.strip()}: exponent less than 0")
            return _wrap64(pow(a, b, 1 << 64))
        funcs = {"+": lambda: a + b, "-": lambda: a - b, "*": lambda: a * b, "<<": lambda: a << (b & 63),
                 ">>": lambda: a >> (b & 63), "&": lambda: a & b, "|": lambda: a | b, "^": lambda: a ^ b,
                 "==": lambda: int(a == b), "!=": lambda: int(a != b), "<": lambda: int(a < b),
                 ">": lambda: int(a > b), "<=": lambda: int(a <= b), ">=": lambda: int(a >= b), ",": lambda: b}
        return _wrap64(funcs[op]())


# ---------------------------------------------------------------- the shell

class Ctx:
    """What one running command sees: the simulation, its open files (0 = an _In, 1 and 2 = sinks), cwd and
    environment; builtins also get their shell. A program writes with ctx.out.write and ctx.err.write."""

    def __init__(self, sim, io, cwd, environ=None, shell=None):
        self.sim, self.io, self.cwd, self.shell, self._environ = sim, io, cwd, shell, environ
        self.prefix = shell.where() + ": " if shell is not None else ""

    @property
    def environ(self):
        if self._environ is None:
            self._environ = self.shell.environ() if self.shell is not None else {}
        return self._environ

    stdin = property(lambda self: self.io.get(0) or _In(""))
    out = property(lambda self: self.io.get(1) or _Null(self.sim))
    err = property(lambda self: self.io.get(2) or _Null(self.sim))

    def abspath(self, path):
        return _FS.norm(path, self.cwd)

    def fail(self, prog, msg):
        self.err.write(f"{self.prefix}{prog}: {msg}\n")

    def open(self, name):
        """A named input ('-' is stdin) as an _In or _Infinite; raises _FsErr."""
        return self.stdin if name == "-" else self.sim.open_read(self.abspath(name))


def _slurp(src):
    return src.read()


class _Shell:
    """One bash (or sh) process: variables, functions, cwd and open files; the file system is shared."""

    def __init__(self, sim, kind="bash", name="bash", cwd=HOME, environ=None, io=None):
        self.sim, self.kind, self.name, self.cwd = sim, kind, name, cwd
        self.vars = dict(environ or {})
        self.exported = set(self.vars)
        self.funcs, self.xfuncs, self.aliases, self.args, self.status = {}, set(), {}, [], 0
        self.io = dict(io) if io else {0: _In(""), 1: sim.term, 2: sim.term}
        self.pid, self.lastbg = sim.new_pid(), ""
        self.errexit = self.xtrace = False
        self.cond = self.funcdepth = self.loopdepth = self.sourcing = self.lineno = 0
        self.locals, self.disabled, self.traps, self.script, self.subst_status = [], set(), {}, False, None
        self.vars["PWD"] = cwd
        if kind == "bash":
            self._import_functions()
            level = self.vars.get("SHLVL", "0")
            self.vars.update(BASH="/usr/bin/bash", BASH_VERSION="5.2.15(1)-release", UID="1000", EUID="1000",
                             PPID=str(self.pid - 1), HOSTNAME="sandbox",
                             SHLVL=str(int(level) + 1 if level.isdigit() else 1))

    def _import_functions(self):
        """bash imports exported functions from BASH_FUNC_name%% environment entries."""
        for key in [k for k in self.vars if k.startswith("BASH_FUNC_") and k.endswith("%%")]:
            value = self.vars.pop(key)
            self.exported.discard(key)
            name = key[10:-2]
            try:
                node = _Parser(f"{name} {value}").command_line().items[0][0].cmds[0]
            except (_Syntax, AttributeError, IndexError):
                node = None
            if node is None or node.kind != "func" or not value.startswith("() "):
                self.io[2].write(f"bash: error importing function definition for `{name}'\n")
                continue
            self.funcs[name] = node
            self.xfuncs.add(name)

    def subshell(self):
        self.sim.tick()                   # a fork
        sub = copy.copy(self)
        sub.vars, sub.exported, sub.funcs, sub.xfuncs = dict(self.vars), set(self.exported), dict(self.funcs), \
            set(self.xfuncs)
        sub.aliases, sub.args, sub.io, sub.traps = dict(self.aliases), list(self.args), dict(self.io), \
            dict(self.traps)
        sub.disabled, sub.locals = set(self.disabled), [dict(f) for f in self.locals]
        return sub

    def environ(self):
        env = {k: v for k, v in self.vars.items() if k in self.exported}
        for name, fn in self.funcs.items():
            if name in self.xfuncs:
                env[f"BASH_FUNC_{name}%%"] = "() " + fn.src
        return env

    def where(self):
        return f"{self.name}: line {self.lineno}" if self.script else self.name

    def err(self, msg, io=None):
        (io or self.io)[2].write(f"{self.where()}: {msg}\n")

    # ------------------------------------------------ variables

    def getvar(self, name):
        if name == "RANDOM":
            return str(self.sim.rng.randrange(32768))
        if name == "LINENO":
            return str(self.lineno)
        if name == "SECONDS":
            return str(int(self.sim.elapsed))
        if name == "BASHPID":
            return str(self.pid)
        return self.vars.get(name)

    def param(self, name):
        if name.isdigit():
            k = int(name)
            return self.name if k == 0 else self.args[k - 1] if k <= len(self.args) else None
        special = {"@": lambda: " ".join(self.args), "*": lambda: " ".join(self.args),
                   "#": lambda: str(len(self.args)), "?": lambda: str(self.status), "$": lambda: str(self.pid),
                   "!": lambda: self.lastbg, "-": lambda: "hB" + "e" * self.errexit + "x" * self.xtrace}
        return special[name]() if name in special else self.getvar(name)

    def setvar(self, name, value, append=False):
        if append:
            value = (self.vars.get(name) or "") + value
        self.sim.charge(len(value))
        if len(value) > FILE_CAP:
            raise _ShellError("xrealloc: cannot allocate memory")
        self.vars[name] = value

    # ------------------------------------------------ expansion

    def expand_single(self, raw):
        """Expand a word without field splitting or globbing (assignments, redirection targets, case)."""
        return "".join(" " if p is None else p[0] for p in self._pieces(raw))

    def expand_pattern(self, raw):
        """Expand a word into a shell pattern: quoted characters are escaped."""
        return "".join(_glob_escape(p[0]) if p[1] else p[0] for p in self._pieces(raw) if p is not None)

    def expand_arith(self, text):
        return "".join(p[0] for p in self._dq_pieces(text) if p is not None)

    def arith(self, text):
        return _Arith(self, text).value()

    def expand_argv(self, raw):
        """Brace expansion, parameter/command/arithmetic expansion, field splitting and globbing."""
        out = []
        for word in (self.braces(raw) if "{" in raw else [raw]):
            out.extend(self._fields(self._pieces(word)))
        return out

    def _fields(self, pieces):
        fields, cur, have = [], [], False
        for piece in pieces:
            if piece is None:
                fields.append(cur)
                cur, have = [], False
                continue
            text, quoted = piece
            if quoted:
                cur.append(piece)
                have = True
                continue
            for seg in re.split(r"([ \t\n]+)", text):
                if not seg:
                    continue
                if seg[0] in " \t\n":
                    if have:
                        fields.append(cur)
                        cur, have = [], False
                else:
                    cur.append((seg, False))
                    have = True
        if have:
            fields.append(cur)
        out = []
        self.sim.tick(len(fields) // 200)
        for field in fields:
            if any(not q and ("*" in t or "?" in t or "[" in t) for t, q in field):
                matches = self.glob("".join(_glob_escape(t) if q else t for t, q in field))
                if matches:
                    out.extend(matches)
                    continue
            out.append(field[0][0] if len(field) == 1 else "".join(t for t, _ in field))
        return out

    def braces(self, word):
        """bash brace expansion: a{b,c}d -> abd acd; {1..3} -> 1 2 3."""
        i, n = 0, len(word)
        while i < n:
            c = word[i]
            if c == "\\":
                i += 2
            elif c == "'":
                i = (word.find("'", i + 1) + 1) or n
            elif c == '"':
                i = _dq_end(word, i) + 1
            elif c == "$" and word[i + 1:i + 2] in ("{", "("):
                i = _match(word, i + 1) + 1
            elif c == "{":
                alts = self._brace_alternatives(word, i)
                if alts is None:
                    i += 1
                    continue
                alts, end = alts
                self.sim.tick(len(alts) // 10)
                out = []
                for alt in alts:
                    out.extend(self.braces(word[:i] + alt + word[end + 1:]))
                    self.sim.tick(len(out) // 10)
                return out
            else:
                i += 1
        return [word]

    def _brace_alternatives(self, word, i):
        depth, j, parts, start = 0, i, [], i + 1
        while j < len(word):
            c = word[j]
            if c == "\\":
                j += 2
                continue
            if c == "'":
                j = (word.find("'", j + 1) + 1) or len(word)
                continue
            if c == '"':
                j = _dq_end(word, j) + 1
                continue
            if c == "{":
                depth += 1
            elif c == "}":
                depth -= 1
                if depth == 0:
                    parts.append(word[start:j])
                    break
            elif c == "," and depth == 1:
                parts.append(word[start:j])
                start = j + 1
            j += 1
        else:
            return None
        if len(parts) > 1:
            return parts, j
        m = re.fullmatch(r"(-?\d+)\.\.(-?\d+)(?:\.\.(-?\d+))?|([a-zA-Z])\.\.([a-zA-Z])", parts[0])
        if not m:
            return None
        if m.group(4):
            a, b = ord(m.group(4)), ord(m.group(5))
            step = 1 if a <= b else -1
            return [chr(k) for k in range(a, b + step, step)], j
        a, b = int(m.group(1)), int(m.group(2))
        step = abs(int(m.group(3) or 1)) or 1
        count = abs(b - a) // step + 1
        self.sim.tick(count // 10)
        return [str(k) for k in range(a, b + (1 if b >= a else -1), step if b >= a else -step)], j

    def glob(self, pat):
        fs, results = self.sim.fs, ["/" if pat.startswith("/") else ""]
        parts = [p for p in pat.split("/") if p]
        for part in parts:
            found = []
            for prefix in results:
                join = (lambda name, prefix=prefix: prefix + name if not prefix or prefix.endswith("/")
                        else prefix + "/" + name)
                if _has_glob(part):
                    try:
                        node = fs.walk(_FS.norm(prefix or ".", self.cwd))
                    except _FsErr:
                        continue
                    if node.kind != "dir" or not fs.can(node, 5):
                        continue
                    rx = re.compile(_glob_re(part), re.S)
                    for name in sorted(node.children):
                        if (not name.startswith(".") or part.startswith(".")) and rx.fullmatch(name):
                            found.append(join(name))
                else:
                    cand = join(re.sub(r"\\(.)", r"\1", part))
                    if fs.exists(_FS.norm(cand, self.cwd), follow=False):
                        found.append(cand)
            results = found
            self.sim.tick(len(found) // 50)
            if not results:
                return []
        if pat.endswith("/"):
            results = [r + "/" for r in results if self._isdir(r)]
        return sorted(results)

    def _isdir(self, path):
        try:
            return self.sim.fs.walk(_FS.norm(path, self.cwd)).kind == "dir"
        except _FsErr:
            return False

    def _pieces(self, raw, quoted=False):
        """Expand a raw word into (text, quoted) pieces; None marks a field break (from "$@")."""
        out, lit, i, n = [], [], 0, len(raw)

        def flush():
            if lit:
                out.append(("".join(lit), quoted))
                lit.clear()

        m = re.match(r"~([A-Za-z0-9_.-]*)(?=/|$)", raw) if not quoted else None
        if m:
            home = (self.vars.get("HOME") or HOME) if not m.group(1) else {USER: HOME, "root": "/root"}.get(
                m.group(1))
            if home is not None:
                out.append((home, True))
                i = m.end()
        while i < n:
            c = raw[i]
            run = _LITERAL_RUN.match(raw, i)
            if run:
                lit.append(run.group())
                i = run.end()
            elif c == "\\":
                flush()
                out.append((raw[i + 1:i + 2], True))
                i += 2
            elif c == "'":
                j = raw.find("'", i + 1)
                j = n if j < 0 else j
                flush()
                out.append((raw[i + 1:j], True))
                i = j + 1
            elif c == '"':
                j = _dq_end(raw, i)
                flush()
                inner = self._dq_pieces(raw[i + 1:j])
                out.extend(inner if inner or "@" in raw[i + 1:j] else [("", True)])
                i = j + 1
            elif raw.startswith("$'", i):
                j = _ansi_end(raw, i + 2)
                flush()
                out.append((_escapes(raw[i + 2:j], ansi=True)[0], True))
                i = j + 1
            elif c in "$`":
                got = self._dollar(raw, i, quoted)
                if got is None:
                    lit.append(c)
                    i += 1
                else:
                    flush()
                    out.extend(got[0])
                    i = got[1]
            else:
                lit.append(c)
                i += 1
        flush()
        return out

    def _dq_pieces(self, text, heredoc=False):
        out, lit, i, n = [], [], 0, len(text)
        specials = "$`\\\n" if heredoc else "$`\"\\\n"
        while i < n:
            c = text[i]
            run = _DQ_LITERAL_RUN.match(text, i)
            if run:
                lit.append(run.group())
                i = run.end()
            elif c == "\\" and i + 1 < n and text[i + 1] in specials:
                if text[i + 1] != "\n":
                    lit.append(text[i + 1])
                i += 2
            elif c in "$`":
                got = self._dollar(text, i, True)
                if got is None:
                    lit.append(c)
                    i += 1
                    continue
                if lit:
                    out.append(("".join(lit), True))
                    lit.clear()
                out.extend(got[0])
                i = got[1]
            else:
                lit.append(c)
                i += 1
        if lit:
            out.append(("".join(lit), True))
        return out

    def _dollar(self, s, i, quoted):
        """Expand the $... or `...` at s[i]: (pieces, end) or None for a literal '$'."""
        if s[i] == "`":
            j = _bq_end(s, i)
            return [(self.command_subst(re.sub(r"\\([`$\\])", r"\1", s[i + 1:j])), quoted)], j + 1
        nxt = s[i + 1:i + 2]
        if s.startswith("$((", i):
            j = _match(s, i + 1)
            return [(str(self.arith(self.expand_arith(s[i + 3:j - 1]))), quoted)], j + 1
        if nxt == "(":
            j = _match(s, i + 1)
            return [(self.command_subst(s[i + 2:j]), quoted)], j + 1
        if nxt == "{":
            j = _match(s, i + 1)
            return self._param(s[i + 2:j], quoted), j + 1
        if nxt and nxt in "@*#?$!-0123456789":
            return self._param_value(nxt, self.param(nxt), quoted), i + 2
        m = _NAME_RE.match(s, i + 1)
        if m:
            return [(self.getvar(m.group()) or "", quoted)], m.end()
        return None

    def _param_value(self, name, value, quoted):
        if name == "@" and quoted:
            out = []
            for k, arg in enumerate(self.args):
                if k:
                    out.append(None)
                out.append((arg, True))
            return out
        return [(value or "", quoted)]

    def _param(self, inner, quoted):
        """${...}: defaults, lengths, prefix/suffix removal, substitution, substrings, case changes."""
        if inner.count("${") > 50:
            raise _ShellError(f"${{{inner[:30]}...}}: expansion nested too deeply")
        if inner in ("#", "@", "*", "?", "$", "!", "-") or inner.isdigit():
            return self._param_value(inner, self.param(inner), quoted)
        if inner.startswith("#") and len(inner) > 1:
            name = inner[1:]
            size = len(self.args) if name in ("@", "*") else len(self.param(name) or "")
            return [(str(size), quoted)]
        indirect = inner.startswith("!")
        body = inner[1:] if indirect else inner
        m = re.match(r"[A-Za-z_][A-Za-z0-9_]*|[0-9]+|[@*#?$!-]", body)
        if not m:
            raise _ShellError(f"${{{inner}}}: bad substitution")
        name, op = m.group(), body[m.end():]
        value = self.param(name)
        if indirect:
            if value and re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*|[0-9]+", value):
                value = self.param(value)
            else:
                raise _ShellError(f"{name}: invalid indirect expansion")
        if not op:
            return self._param_value(name, value, quoted)
        m = re.match(r":?[-=+?]", op)
        if m:
            word, null = op[m.end():], value is None or (m.group()[0] == ":" and value == "")
            kind = m.group()[-1]
            if kind == "-":
                return self._pieces(word, quoted) if null else [(value, quoted)]
            if kind == "+":
                return [] if null else self._pieces(word, quoted)
            if kind == "=":
                if null:
                    value = self.expand_single(word)
                    self.setvar(name, value)
                return [(value, quoted)]
            if null:
                raise _ShellError(f"{name}: {self.expand_single(word) or 'parameter null or not set'}")
            return [(value, quoted)]
        value = value or ""
        if op[0] in "#%":
            longest = op[:2] in ("##", "%%")
            pat = self.expand_pattern(op[2 if longest else 1:])
            rx = re.compile(_glob_re(pat), re.S)
            self.sim.tick(len(value) // 64)
            cuts = range(len(value) + 1)
            if op[0] == "#":
                for k in (reversed(cuts) if longest else cuts):
                    if rx.fullmatch(value, 0, k):
                        return [(value[k:], quoted)]
            else:
                for k in (cuts if longest else reversed(cuts)):
                    if rx.fullmatch(value, k):
                        return [(value[:k], quoted)]
            return [(value, quoted)]
        if op[0] == "/":
            body, mode = op[1:], ""
            if body[:1] in ("/", "#", "%"):
                mode, body = body[0], body[1:]
            m = re.match(r"((?:\\.|[^/])*)(?:/(.*))?$", body, re.S)
            pat, rep = self.expand_pattern(m.group(1)), self.expand_single(m.group(2) or "")
            if not pat:
                return [(value, quoted)]
            rx = _glob_re(pat)
            rx = "^(?:" + rx + ")" if mode == "#" else "(?:" + rx + ")$" if mode == "%" else rx
            new = re.sub(rx, lambda _m: rep, value, count=0 if mode == "/" else 1, flags=re.S)
            return [(new, quoted)]
        if op[0] == ":":
            parts = op[1:].split(":", 1)
            off = self.arith(self.expand_arith(parts[0]) or "0")
            off = max(0, len(value) + off) if off < 0 else off
            if len(parts) > 1:
                length = self.arith(self.expand_arith(parts[1]) or "0")
                end = off + length if length >= 0 else len(value) + length
                return [(value[off:end], quoted)]
            return [(value[off:], quoted)]
        cases = {"^^": value.upper(), ",,": value.lower(), "^": value[:1].upper() + value[1:],
                 ",": value[:1].lower() + value[1:]}
        if op in cases:
            return [(cases[op], quoted)]
        raise _ShellError(f"${{{inner}}}: bad substitution")

    def command_subst(self, text):
        sub = self.subshell()
        buf = _Buf(self.sim, FILE_CAP)
        sub.io[1] = buf
        try:
            with self.sim.nest():
                status = sub.run_text(text)
        except _Exit as e:
            status = e.status
        except _Break:
            status = sub.status
        self.subst_status = status
        return buf.text().rstrip("\n")

    # ------------------------------------------------ running

    def run_text(self, text, where=None):
        """Parse and run a script one complete command at a time; a syntax error stops it (status 2)."""
        parser = _Parser(text)
        while True:
            try:
                try:
                    node = parser.command_line()
                except RecursionError:
                    raise _Syntax("syntax error: expression nested too deeply")
            except _Syntax as e:
                prefix = f"{self.name}: line {parser.lx.line}" if self.script else f"{self.name}: -c: line " \
                                                                                   f"{parser.lx.line}"
                self.io[2].write(f"{prefix}: {e.msg}\n")
                self.status = 2
                return 2
            finally:
                for note in parser.lx.notes:
                    self.io[2].write(f"{self.where()}: {note}\n")
                parser.lx.notes.clear()
            if node is None:
                return self.status
            self.execute(node)

    def execute(self, node):
        kind = node.kind
        if kind == "list":
            status = 0
            for item, background in node.items:
                self.sim.check_stop()
                if background:
                    sub = self.subshell()
                    self.sim.background += 1
                    try:
                        with self.sim.nest():
                            sub.execute(item)
                    except (_Exit, _Break):
                        pass
                    finally:
                        self.sim.background -= 1
                    self.lastbg, status = str(self.sim.new_pid()), 0
                else:
                    status = self.execute(item)
            self.status = status
            return status
        if kind == "andor":
            self.cond += 1
            try:
                status = self.execute(node.first)
            finally:
                self.cond -= 1
            for k, (op, pipe) in enumerate(node.rest):
                if (status == 0) != (op == "&&"):
                    continue
                inner = k < len(node.rest) - 1
                self.cond += inner
                try:
                    status = self.execute(pipe)
                finally:
                    self.cond -= inner
            self.status = status
            return status
        if kind == "pipe":
            return self.run_pipeline(node)
        return self.run_cmd(node)

    def run_pipeline(self, node):
        if len(node.cmds) == 1:
            self.cond += node.neg
            try:
                status = self.run_cmd(node.cmds[0])
            finally:
                self.cond -= node.neg
        else:
            data = None
            for k, cmd in enumerate(node.cmds):
                sub, last = self.subshell(), k == len(node.cmds) - 1
                if data is not None:
                    sub.io[0] = _In(data)
                if not last:
                    buf = _Buf(self.sim, PIPE_CAP)
                    sub.io[1] = buf
                    if node.amp[k]:
                        sub.io[2] = buf
                try:
                    with self.sim.nest():
                        status = sub.run_cmd(cmd)
                except _Exit as e:
                    status = e.status
                except _Break:
                    status = sub.status
                except _ShellError as e:
                    self.err(e.msg)
                    status = e.status
                if not last:
                    data = buf.text()
        if node.timed:
            self.io[2].write("\nreal\t0m0.001s\nuser\t0m0.000s\nsys\t0m0.000s\n")
        if node.neg:
            status = int(status == 0)
        elif status and self.errexit and not self.cond:
            self.status = status
            raise _Exit(status)
        self.status = status
        return status

    def run_cmd(self, node):
        if node.kind == "simple":
            return self.run_simple(node)
        if node.kind == "func":
            self.funcs[node.name] = node
            return 0
        saved = self.io
        try:
            if node.redirs:
                self.io = self.redirect(node.redirs, self.io)
            return self.compound(node)
        except _ShellError as e:
            if e.msg:
                self.err(e.msg)
            return e.status
        finally:
            self.io = saved

    def compound(self, node):
        kind = node.kind
        if kind == "brace":
            return self.execute(node.body)
        if kind == "sub":
            sub = self.subshell()
            try:
                with self.sim.nest():
                    return sub.execute(node.body)
            except _Exit as e:
                return e.status
            except _Break:
                return sub.status
        if kind == "if":
            for cond, body in node.arms:
                self.cond += 1
                try:
                    ok = self.execute(cond) == 0
                finally:
                    self.cond -= 1
                if ok:
                    return self.execute(body)
            return self.execute(node.other) if node.other else 0
        if kind in ("while", "for", "cfor"):
            return self.loop(node)
        if kind == "case":
            word = self.expand_single(node.word)
            for pats, body in node.arms:
                if any(_glob_match(self.expand_pattern(p), word) for p in pats):
                    return self.execute(body) if body.items else 0
            return 0
        if kind == "arith":
            return int(self.arith(self.expand_arith(node.expr)) == 0)
        if kind == "dbl":
            return self.double_bracket(node)
        raise _ShellError("unsupported syntax", 2)

    def loop(self, node):
        status, sim, kind = 0, self.sim, node.kind
        if kind == "for":
            items = ([w for raw in node.words for w in self.expand_argv(raw)] if node.words is not None
                     else list(self.args))
        elif kind == "cfor" and node.init.strip():
            self.arith(self.expand_arith(node.init))
        self.loopdepth += 1
        try:
            k = 0
            while True:
                sim.tick()
                sim.check_stop()
                if kind == "for":
                    if k >= len(items):
                        break
                    self.setvar(node.var, items[k])
                    k += 1
                elif kind == "cfor":
                    if node.cond.strip() and not self.arith(self.expand_arith(node.cond)):
                        break
                else:
                    self.cond += 1
                    try:
                        ok = self.execute(node.cond) == 0
                    finally:
                        self.cond -= 1
                    if ok == node.until:
                        break
                try:
                    status = self.execute(node.body)
                except _Continue as c:
                    if c.n > 1:
                        c.n -= 1
                        raise
                except _Break as b:
                    if b.n > 1:
                        b.n -= 1
                        raise
                    break
                if kind == "cfor" and node.step.strip():
                    self.arith(self.expand_arith(node.step))
        finally:
            self.loopdepth -= 1
        return status

    def double_bracket(self, node):
        vals, prev = [], None
        for kind, raw in node.toks:
            if kind == "RE":
                vals.append(self.expand_single(raw))
            elif kind != "W" or raw in ("!", "&&", "||"):
                vals.append(raw)
            elif prev in ("==", "=", "!="):
                vals.append(self.expand_pattern(raw))
            else:
                vals.append(self.expand_single(raw))
            prev = raw
        ctx = Ctx(self.sim, self.io, self.cwd, shell=self)
        try:
            return 0 if _test_eval(ctx, vals, dbl=True, arith=self.arith) else 1
        except _Usage as u:
            self.err(f"conditional binary operator expected ({u})")
            return 2

    def run_simple(self, node):
        sim = self.sim
        sim.tick()
        self.lineno, self.subst_status = node.line, None
        try:
            argv = []
            decl = bool(node.words) and node.words[0] in ("export", "local", "declare", "typeset", "readonly")
            for k, raw in enumerate(node.words):
                m = _ASSIGN_RE.match(raw) if decl and k else None
                if m:
                    argv.append(f"{m.group(1)}{m.group(2)}={self.expand_single(m.group(3))}")
                else:
                    argv.extend(self.expand_argv(raw))
            assigns = []
            for raw in node.assigns:
                name, plus, value = _ASSIGN_RE.match(raw).groups()
                assigns.append((name, self.expand_single(value), bool(plus)))
            if argv and sim.on_command is not None:
                sim.on_command(argv, self.program_of)
            if self.xtrace:
                self.io[2].write("+ " + " ".join([f"{n}={v}" for n, v, _ in assigns] + argv) + "\n")
            io = self.redirect(node.redirs, self.io)
            if not argv:
                for name, value, plus in assigns:
                    self.setvar(name, value, plus)
                return self.subst_status or 0
            if argv[0] == "exec" and len(argv) == 1:
                self.io = io
                return 0
            return self.invoke(argv, io, assigns)
        except _ShellError as e:
            if e.msg:
                self.err(e.msg)
            return e.status
        except RecursionError:
            self.err("expression nested too deeply")
            return 2

    def invoke(self, argv, io, assigns=(), functions=True, builtins=True):
        name = argv[0]
        if "/" not in name:
            if functions and name in self.funcs:
                return self.call_function(name, argv, io, assigns)
            # kill is a builtin in bash and dash, so an executable called kill in PATH does not shadow it,
            # unless the environment was built with kill_builtin=False
            if (builtins and name in _BUILTINS and name not in self.disabled
                    and (name != "kill" or self.sim.kill_builtin)):
                with self.temp_vars(assigns, persist=name in _SPECIAL_BUILTINS):
                    return self.sim.call(_BUILTINS[name], Ctx(self.sim, io, self.cwd, shell=self), argv,
                                         self.where() + ": " + name)
            found = self.sim.path_lookup(name, self.vars.get("PATH", ""), self.cwd)
            if not found:
                self.err(f"{name}: command not found", io)
                return 127
            path = found[0]
        else:
            path = name
        environ = self.environ()
        for var, value, plus in assigns:
            environ[var] = (environ.get(var, "") if plus else "") + value
        ctx = Ctx(self.sim, io, self.cwd, environ)
        return self.sim.exec_file(path, argv, ctx, self.where(), fallback=self.kind)

    @contextlib.contextmanager
    def temp_vars(self, assigns, persist=False):
        saved = [] if persist else [(n, self.vars.get(n), n in self.exported) for n, _, _ in assigns]
        for name, value, plus in assigns:
            self.setvar(name, value, plus)
            if not persist:
                self.exported.add(name)
        try:
            yield
        finally:
            for name, old, was_exported in saved:
                if old is None:
                    self.vars.pop(name, None)
                else:
                    self.vars[name] = old
                if not was_exported:
                    self.exported.discard(name)

    def call_function(self, name, argv, io, assigns):
        fn = self.funcs[name]
        with self.sim.nest(), self.temp_vars(assigns):
            saved = (self.args, self.io)
            self.args, self.io = argv[1:], io
            self.locals.append({})
            self.funcdepth += 1
            try:
                return self.run_cmd(fn.body)
            except _Return as r:
                return r.status
            finally:
                self.funcdepth -= 1
                for var, (old, was_exported) in self.locals.pop().items():
                    if old is None:
                        self.vars.pop(var, None)
                    else:
                        self.vars[var] = old
                    (self.exported.add if was_exported else self.exported.discard)(var)
                self.args, self.io = saved

    def program_of(self, name):
        """The installed program that the command `name` runs here, or None (a function, a builtin, a script or
        nothing)."""
        if name in self.funcs or ("/" not in name and name in _BUILTINS):
            return None
        found = [name] if "/" in name else self.sim.path_lookup(name, self.vars.get("PATH", ""), self.cwd)
        try:
            node = self.sim.fs.walk(_FS.norm(found[0], self.cwd)) if found else None
        except _FsErr:
            return None
        return node.prog if node is not None and node.kind == "bin" else None

    def redirect(self, redirs, io):
        if not redirs:
            return io
        io = dict(io)
        for fd, op, target in redirs:
            if op in ("<<", "<<-"):
                body = target["body"]
                io[0 if fd is None else fd] = _In(body if target["quoted"] else "".join(
                    p[0] for p in self._dq_pieces(body, heredoc=True) if p is not None))
                continue
            if op == "<<<":
                io[0 if fd is None else fd] = _In(self.expand_single(target) + "\n")
                continue
            words = self.expand_argv(target)
            if len(words) != 1:
                raise _ShellError(f"{target}: ambiguous redirect")
            word = words[0]
            if op in (">&", "<&") and (word.isdigit() or word == "-"):
                dst = fd if fd is not None else (1 if op == ">&" else 0)
                if word == "-":
                    io[dst] = _Null(self.sim) if dst else _In("")
                elif int(word) not in io:
                    raise _ShellError(f"{word}: Bad file descriptor")
                else:
                    io[dst] = io[int(word)]
                continue
            try:
                if op in ("<", "<>"):
                    io[0 if fd is None else fd] = self.sim.open_read(_FS.norm(word, self.cwd))
                else:
                    sink = self.sim.open_write(word, self.cwd, op in (">>", "&>>"), io)
                    if op in ("&>", "&>>") or (op == ">&" and fd is None):
                        io[1] = io[2] = sink
                    else:
                        io[1 if fd is None else fd] = sink
            except _FsErr as e:
                raise _ShellError(f"{word}: {e}")
            except _WriteFailed as e:
                raise _ShellError(f"{word}: {e}")
        return io

    def source_file(self, name, args=None):
        """`source`: run a file's text in this shell."""
        path = _FS.norm(name, self.cwd)
        self.sim.note_exec(path)
        try:
            text = _slurp(self.sim.open_read(path))
        except _FsErr as e:
            self.err(f"{name}: {e}")
            return 1
        saved = (self.name, self.script, self.lineno, self.args)
        self.name, self.script = name, True
        if args is not None:
            self.args = args
        self.sourcing += 1
        try:
            with self.sim.nest():
                return self.run_text(text)
        except _Return as r:
            return r.status
        finally:
            self.sourcing -= 1
            self.name, self.script, self.lineno = saved[:3]
            if args is not None:
                self.args = saved[3]

    def source_profiles(self):
        """What a login shell reads: /etc/profile, then the first of ~/.bash_profile, ~/.bash_login, ~/.profile."""
        if self.sim.fs.exists("/etc/profile"):
            self.source_file("/etc/profile")
        for name in ((".bash_profile", ".bash_login", ".profile") if self.kind == "bash" else (".profile",)):
            if self.sim.fs.exists(HOME + "/" + name):
                self.source_file(HOME + "/" + name)
                break


# ---------------------------------------------------------------- helpers for commands

def basename(path):
    """The last component of a path, as basename(1) gives it."""
    return path.rstrip("/").rsplit("/", 1)[-1] or "/"


def _getopt(args, flags, valued="", longs=None):
    """GNU-style short options (may follow operands); returns (opts, operands). Unknown ones raise _Usage."""
    opts, rest, i, longs = {}, [], 0, longs or {}
    while i < len(args):
        arg = args[i]
        if arg == "--":
            rest.extend(args[i + 1:])
            break
        if arg.startswith("--"):
            key, eq, val = arg[2:].partition("=")
            if key not in longs:
                raise _Usage(f"unrecognized option '{arg}'")
            opts[longs[key]] = val if eq else True
        elif arg.startswith("-") and len(arg) > 1:
            for j in range(1, len(arg)):
                c = arg[j]
                if c in valued:
                    val = arg[j + 1:]
                    if not val:
                        i += 1
                        if i >= len(args):
                            raise _Usage(f"option requires an argument -- '{c}'")
                        val = args[i]
                    opts[c] = val
                    break
                if c not in flags:
                    raise _Usage(f"invalid option -- '{c}'")
                opts[c] = True
        else:
            rest.append(arg)
        i += 1
    return opts, rest


def _escapes(text, ansi=False, printf=False):
    """Backslash escapes of echo -e, printf and $'...': returns (text, stopped_by_backslash_c)."""
    simple = {"a": "\a", "b": "\b", "e": "\x1b", "E": "\x1b", "f": "\f", "n": "\n", "r": "\r", "t": "\t",
              "v": "\v", "\\": "\\"}
    if ansi:
        simple.update({"'": "'", '"': '"'})
    out, i, n = [], 0, len(text)
    while i < n:
        c = text[i]
        if c != "\\" or i + 1 >= n:
            out.append(c)
            i += 1
            continue
        d = text[i + 1]
        octal = re.match(r"[0-7]{1,3}", text[i + 1:]) if (printf or ansi) else (
            re.match(r"0[0-7]{0,3}", text[i + 1:]))
        if d in simple:
            out.append(simple[d])
            i += 2
        elif d == "c" and not ansi:
            return "".join(out), True
        elif d == "x" and re.match(r"[0-9a-fA-F]{1,2}", text[i + 2:]):
            m = re.match(r"[0-9a-fA-F]{1,2}", text[i + 2:])
            out.append(chr(int(m.group(), 16)))
            i += 2 + m.end()
        elif octal:
            digits = octal.group() if (printf or ansi) else octal.group()[1:] or "0"
            out.append(chr(int(digits, 8) & 255))
            i += 1 + octal.end()
        else:
            out.append("\\" + d)
            i += 2
    return "".join(out), False


def _quote(text):
    return text if re.fullmatch(r"[\w@%+=:,./-]+", text) else "'" + text.replace("'", "'\\''") + "'"


def _mode_string(node):
    kind = {"dir": "d", "link": "l", "dev": "c"}.get(node.kind, "-")
    bits = "".join(ch if node.mode & (1 << (8 - k)) else "-" for k, ch in enumerate("rwxrwxrwx"))
    if node.mode & 0o1000:
        bits = bits[:8] + ("t" if bits[8] == "x" else "T")
    return kind + bits


def _when(node):
    return BASE_TIME + datetime.timedelta(seconds=node.mtime)


def _blocks(node):
    if node.kind == "dir":
        return 4
    return 0 if node.kind in ("link", "dev") else 4 * -(-node.size // 4096)


def _human(size):
    for unit in ("", "K", "M", "G"):
        if size < 1024 or unit == "G":
            return str(int(size)) if not unit else (f"{size:.1f}{unit}" if size < 10 else f"{round(size)}{unit}")
        size /= 1024


def _walk_tree(ctx, prog, disp, node, depth=0, maxdepth=100):
    """Pre-order walk yielding (display path, node, depth); unreadable directories are reported."""
    yield disp, node, depth
    if node.kind != "dir" or depth >= maxdepth:
        return
    if not ctx.sim.fs.can(node, 5):
        ctx.fail(prog, f"'{disp}': Permission denied" if prog == "find" else f"{disp}: Permission denied")
        return
    for name in sorted(node.children):
        ctx.sim.tick()
        child = node.children.get(name)
        if child is not None:
            yield from _walk_tree(ctx, prog, disp + name if disp.endswith("/") else disp + "/" + name, child,
                                  depth + 1, maxdepth)


def _inputs(ctx, prog, names):
    """[(name, text)] for each input file ('-' or none: stdin); errors are printed. Returns (items, status)."""
    items, status = [], 0
    for name in names or ["-"]:
        try:
            items.append((name, _slurp(ctx.open(name))))
        except _FsErr as e:
            ctx.fail(prog, f"{name}: {e}")
            status = 1
    return items, status


def _lines(text):
    return text.split("\n")[:-1] if text.endswith("\n") else (text.split("\n") if text else [])


# ---------------------------------------------------------------- builtins (they get ctx.shell)

def _b_true(ctx, argv):
    return 0


def _b_false(ctx, argv):
    return 1


def _b_cd(ctx, argv):
    sh = ctx.shell
    args = [a for a in argv[1:] if a not in ("-L", "-P", "--")]
    if len(args) > 1:
        ctx.fail("cd", "too many arguments")
        return 1
    target = args[0] if args else sh.vars.get("HOME", "")
    show = target == "-"
    if show:
        target = sh.vars.get("OLDPWD", "")
        if not target:
            ctx.fail("cd", "OLDPWD not set")
            return 1
    if not target:
        return 0
    path = _FS.norm(target, sh.cwd)
    try:
        node = ctx.sim.fs.walk(path)
        if node.kind != "dir":
            raise _FsErr("Not a directory")
        if not ctx.sim.fs.can(node, 1):
            raise _FsErr("Permission denied")
    except _FsErr as e:
        ctx.fail("cd", f"{target}: {e}")
        return 1
    sh.vars["OLDPWD"], sh.cwd, sh.vars["PWD"] = sh.cwd, path, path
    if show:
        ctx.out.write(path + "\n")
    return 0


def _b_export(ctx, argv):
    sh, status, flags, names = ctx.shell, 0, "", []
    for arg in argv[1:]:
        if not names and re.fullmatch(r"-[fnp]+", arg):
            flags += arg[1:]
        else:
            names.append(arg)
    if not names:
        for key, value in sh.vars.items():
            if key in sh.exported:
                ctx.out.write(f'declare -x {key}="{value}"\n')
        return 0
    for arg in names:
        m = re.match(r"([^=]*?)(\+?=(.*))?$", arg, re.S)
        name = m.group(1)
        if "f" in flags:
            if name not in sh.funcs:
                ctx.fail("export", f"{name}: not a function")
                status = 1
            else:
                (sh.xfuncs.discard if "n" in flags else sh.xfuncs.add)(name)
            continue
        if not _NAME_RE.fullmatch(name):
            ctx.fail("export", f"`{arg}': not a valid identifier")
            status = 1
            continue
        if m.group(2):
            sh.setvar(name, m.group(3), m.group(2).startswith("+"))
        (sh.exported.discard if "n" in flags else sh.exported.add)(name)
    return status


def _b_declare(ctx, argv):
    sh, status, flags, names, prog = ctx.shell, 0, "", [], argv[0]
    for arg in argv[1:]:
        if not names and re.fullmatch(r"[-+][a-zA-Z]+", arg):
            flags += arg[1:] if arg[0] == "-" else ""
        else:
            names.append(arg)
    if prog == "local" and not sh.funcdepth:
        ctx.fail("local", "can only be used in a function")
        return 1
    local = prog == "local" or (sh.funcdepth and "g" not in flags and prog != "readonly")
    if "f" in flags or "F" in flags:
        for name in names or list(sh.funcs):
            if name not in sh.funcs:
                status = 1
            elif "x" in flags:
                sh.xfuncs.add(name)
            elif "F" in flags:
                ctx.out.write(f"declare -f {name}\n")
            else:
                ctx.out.write(f"{name} () {sh.funcs[name].src}\n")
        return status
    if not names:
        for key, value in sh.vars.items():
            if "x" not in flags or key in sh.exported:
                ctx.out.write(f"declare {'-x' if key in sh.exported else '--'} {key}=\"{value}\"\n")
        return 0
    for arg in names:
        m = re.fullmatch(r"([A-Za-z_][A-Za-z0-9_]*)(\+?=(.*))?", arg, re.S)
        if not m:
            ctx.fail(prog, f"`{arg}': not a valid identifier")
            status = 1
            continue
        name = m.group(1)
        if "p" in flags:
            if name in sh.vars:
                ctx.out.write(f"declare {'-x' if name in sh.exported else '--'} {name}=\"{sh.vars[name]}\"\n")
            else:
                ctx.fail(prog, f"{name}: not found")
                status = 1
            continue
        if local and sh.locals and name not in sh.locals[-1]:
            sh.locals[-1][name] = (sh.vars.get(name), name in sh.exported)
            if m.group(2) is None:
                sh.vars.pop(name, None)
        if m.group(2):
            sh.setvar(name, m.group(3), m.group(2).startswith("+"))
        if "x" in flags:
            sh.exported.add(name)
    return status


def _b_unset(ctx, argv):
    sh, mode = ctx.shell, None
    for arg in argv[1:]:
        if arg in ("-f", "-v", "-n"):
            mode = arg[1]
        elif mode != "f" and (mode in ("v", "n") or arg in sh.vars):
            sh.vars.pop(arg, None)
            sh.exported.discard(arg)
        elif mode != "v":
            sh.funcs.pop(arg, None)
            sh.xfuncs.discard(arg)
    return 0


def _b_alias(ctx, argv):
    sh, status = ctx.shell, 0
    args = [a for a in argv[1:] if a != "-p"]
    if not args:
        for name, value in sorted(sh.aliases.items()):
            ctx.out.write(f"alias {name}={_quote(value)}\n")
    for arg in args:
        name, eq, value = arg.partition("=")
        if eq:
            sh.aliases[name] = value
        elif name in sh.aliases:
            ctx.out.write(f"alias {name}={_quote(sh.aliases[name])}\n")
        else:
            ctx.fail("alias", f"{name}: not found")
            status = 1
    return status


def _b_unalias(ctx, argv):
    sh, status = ctx.shell, 0
    for arg in argv[1:]:
        if arg == "-a":
            sh.aliases.clear()
        elif sh.aliases.pop(arg, None) is None:
            ctx.fail("unalias", f"{arg}: not found")
            status = 1
    return status


def _b_source(ctx, argv):
    sh = ctx.shell
    if len(argv) < 2:
        ctx.fail(argv[0], "filename argument required")
        return 2
    name = argv[1]
    if "/" not in name:
        found = ctx.sim.path_lookup(name, sh.vars.get("PATH", ""), sh.cwd, bits=4)
        name = found[0] if found else name
    return sh.source_file(name, argv[2:] if len(argv) > 2 else None)


def _status_arg(ctx, argv, default):
    if len(argv) < 2:
        return default
    try:
        return int(argv[1]) & 255
    except ValueError:
        ctx.fail(argv[0], f"{argv[1]}: numeric argument required")
        return 2


def _b_exit(ctx, argv):
    raise _Exit(_status_arg(ctx, argv, ctx.shell.status))


def _b_return(ctx, argv):
    if not (ctx.shell.funcdepth or ctx.shell.sourcing):
        ctx.fail("return", "can only `return' from a function or sourced script")
        return 1
    raise _Return(_status_arg(ctx, argv, ctx.shell.status))


def _b_break(ctx, argv):
    if not ctx.shell.loopdepth:
        ctx.fail(argv[0], "only meaningful in a `for', `while', or `until' loop")
        return 0
    count = argv[1] if len(argv) > 1 else "1"
    if not count.isdigit() or int(count) < 1:
        ctx.fail(argv[0], f"{count}: loop count out of range")
        return 1
    raise (_Break if argv[0] == "break" else _Continue)(int(count))


def _b_shift(ctx, argv):
    sh = ctx.shell
    count = int(argv[1]) if len(argv) > 1 and argv[1].isdigit() else 1
    if count > len(sh.args):
        return 1
    sh.args = sh.args[count:]
    return 0


def _b_eval(ctx, argv):
    return ctx.shell.run_text(" ".join(argv[1:]))


def _b_exec(ctx, argv):
    args = argv[1:]
    while args and args[0] in ("-c", "-l", "-a", "--"):
        args = args[2:] if args[0] == "-a" else args[1:]
    if not args:
        return 0
    raise _Exit(ctx.shell.invoke(args, ctx.io, functions=False, builtins=False))


def _b_set(ctx, argv):
    sh, args = ctx.shell, argv[1:]
    if not args:
        for key in sorted(sh.vars):
            ctx.out.write(f"{key}={_quote(sh.vars[key])}\n")
        return 0
    while args:
        arg = args[0]
        if arg == "--":
            sh.args = args[1:]
            return 0
        if arg in ("-o", "+o"):
            if len(args) < 2:
                ctx.out.write(f"errexit        \t{'on' if sh.errexit else 'off'}\n"
                              f"xtrace         \t{'on' if sh.xtrace else 'off'}\n")
                return 0
            if args[1] == "errexit":
                sh.errexit = arg == "-o"
            elif args[1] == "xtrace":
                sh.xtrace = arg == "-o"
            args = args[2:]
        elif re.fullmatch(r"[-+][a-zA-Z]+", arg):
            if "e" in arg:
                sh.errexit = arg[0] == "-"
            if "x" in arg:
                sh.xtrace = arg[0] == "-"
            args = args[1:]
        else:
            sh.args = list(args)
            return 0
    return 0


def _describe(sh, name, every=False):
    """What `name` would run: [(kind, description, path-or-name)], as type / command -v report it."""
    found = []
    if name in sh.aliases:
        value = sh.aliases[name]
        found.append(("alias", f"{name} is aliased to `{value}'", f"alias {name}={_quote(value)}"))
    if name in _KEYWORDS:
        found.append(("keyword", f"{name} is a shell keyword", name))
    if name in sh.funcs:
        found.append(("function", f"{name} is a function\n{name} () {sh.funcs[name].src}", name))
    if name in _BUILTINS and name not in sh.disabled:
        found.append(("builtin", f"{name} is a shell builtin", name))
    if "/" in name:
        paths = [name] if sh.sim.path_lookup(basename(name), _FS.norm(name, sh.cwd).rsplit("/", 1)[0] or "/", "/") \
            else []
    else:
        paths = sh.sim.path_lookup(name, sh.vars.get("PATH", ""), sh.cwd, every=True)
    found += [("file", f"{name} is {path}", path) for path in paths]
    return found if every else found[:1]


def _b_type(ctx, argv):
    opts, names = _getopt(argv[1:], "tpaPf")
    status = 0
    for name in names:
        if "P" in opts:       # -P: search PATH even for builtins and functions
            found = [f for f in _describe(ctx.shell, name, every=True) if f[0] == "file"][:None if "a" in opts else 1]
        else:
            found = _describe(ctx.shell, name, every="a" in opts)
            if "p" in opts:
                found = [f for f in found if f[0] == "file"]
        if not found:
            if not ("t" in opts or "p" in opts):
                ctx.fail("type", f"{name}: not found")
            status = 1
        for kind, text, path in found:
            ctx.out.write((kind if "t" in opts else path if ("p" in opts or "P" in opts) else text) + "\n")
    return status


def _b_command(ctx, argv):
    args = argv[1:]
    mode = None
    while args and args[0] in ("-v", "-V", "-p"):
        mode = args.pop(0)[1] if args[0] != "-p" else mode
    if mode:
        status = 0
        for name in args:
            found = _describe(ctx.shell, name)
            if not found:
                if mode == "V":
                    ctx.fail("command", f"{name}: not found")
                status = 1
            else:
                ctx.out.write((found[0][1] if mode == "V" else found[0][2]) + "\n")
        return status
    if not args:
        return 0
    return ctx.shell.invoke(args, ctx.io, functions=False)


def _b_builtin(ctx, argv):
    if len(argv) < 2:
        return 0
    if argv[1] not in _BUILTINS:
        ctx.fail("builtin", f"{argv[1]}: not a shell builtin")
        return 1
    return ctx.sim.call(_BUILTINS[argv[1]], ctx, argv[1:], ctx.prefix + argv[1])


def _b_enable(ctx, argv):
    sh, args = ctx.shell, argv[1:]
    disable = bool(args) and args[0] == "-n"
    args = [a for a in args if not a.startswith("-")]
    if not args:
        for name in sorted(_BUILTINS):
            if (name in sh.disabled) == disable:
                ctx.out.write(f"enable {'-n ' if disable else ''}{name}\n")
        return 0
    status = 0
    for name in args:
        if name not in _BUILTINS:
            ctx.fail("enable", f"{name}: not a shell builtin")
            status = 1
        else:
            (sh.disabled.add if disable else sh.disabled.discard)(name)
    return status


def _b_read(ctx, argv):
    opts, names = _getopt(argv[1:], "rse", valued="pntdau")
    sh = ctx.shell
    line = ctx.stdin.readline()
    if line is None:
        for name in names or ["REPLY"]:
            sh.setvar(name, "")
        return 1
    complete = line.endswith("\n")
    line = line[:-1] if complete else line
    if "r" not in opts:
        line = re.sub(r"\\(.)", r"\1", line)
    if not names:
        sh.setvar("REPLY", line)
    else:
        fields = line.strip(" \t").split(None, len(names) - 1) if line.strip() else []
        for k, name in enumerate(names):
            sh.setvar(name, fields[k].rstrip(" \t") if k < len(fields) else "")
    return 0 if complete else 1


def _b_let(ctx, argv):
    value = 0
    for expr in argv[1:]:
        value = ctx.shell.arith(expr)
    return 0 if value else 1


def _b_trap(ctx, argv):
    sh = ctx.shell
    if len(argv) < 3:
        for sig, action in sh.traps.items():
            ctx.out.write(f"trap -- {_quote(action)} {sig}\n")
        return 0
    for sig in argv[2:]:
        if argv[1] == "-":
            sh.traps.pop(sig, None)
        else:
            sh.traps[sig] = argv[1]
    return 0


def _b_umask(ctx, argv):
    args = [a for a in argv[1:] if a != "-S"]
    if not args:
        ctx.out.write(f"{ctx.sim.umask:04o}\n")
    elif re.fullmatch(r"[0-7]{1,4}", args[0]):
        ctx.sim.umask = int(args[0], 8)
    else:
        ctx.fail("umask", f"{args[0]}: octal number out of range")
        return 1
    return 0


def _b_noop(ctx, argv):
    if argv[0] == "ulimit":
        ctx.out.write("unlimited\n")
    elif argv[0] == "times":
        ctx.out.write("0m0.001s 0m0.000s\n0m0.000s 0m0.000s\n")
    elif argv[0] in ("fg", "bg"):
        ctx.fail(argv[0], "no job control")
        return 1
    return 0


def _b_logout(ctx, argv):
    raise _Exit(_status_arg(ctx, argv, ctx.shell.status))


# ---------------------------------------------------------------- programs (also the shared builtins)

def _p_echo(ctx, argv):
    args, newline, esc = argv[1:], True, ctx.shell is not None and ctx.shell.kind == "sh"
    while args and re.fullmatch(r"-[neE]+", args[0]) and not (esc and args[0] != "-n"):
        for ch in args[0][1:]:
            newline, esc = (False, esc) if ch == "n" else (newline, ch == "e")
        args = args[1:]
    text = " ".join(args)
    if esc:
        text, stop = _escapes(text)
        newline = newline and not stop
    ctx.out.write(text + ("\n" if newline else ""))
    return 0


_PRINTF_SPEC = re.compile(r"%([-+ #0]*)(\*|\d+)?(?:\.(\*|\d*))?([diouxXfFeEgGcsbq%])")


def _p_printf(ctx, argv):
    args, var = argv[1:], None
    if ctx.shell is not None and len(args) >= 2 and args[0] == "-v":
        var, args = args[1], args[2:]
    if args and args[0] == "--":
        args = args[1:]
    if not args:
        raise _Usage("usage: printf [-v var] format [arguments]")
    fmt, args, out, status = args[0], args[1:], [], 0

    def number(arg, conv):
        nonlocal status
        if arg is None or arg == "":
            return 0
        if arg[:1] in "'\"" and len(arg) > 1:
            return ord(arg[1])
        try:
            return float(arg) if conv in "fFeEgG" else int(arg, 0) if re.fullmatch(r"[-+]?0[xX]?[0-9a-fA-F]*",
                                                                                  arg) else int(arg)
        except ValueError:
            ctx.fail("printf", f"{arg}: invalid number")
            status = 1
            return 0

    while True:
        used, pos = 0, 0
        for m in _PRINTF_SPEC.finditer(fmt):
            out.append(_escapes(fmt[pos:m.start()], printf=True)[0])
            pos = m.end()
            flags, width, prec, conv = m.groups()
            if conv == "%":
                out.append("%")
                continue
            if width == "*":
                width = str(number(args[used] if used < len(args) else None, "d"))
                used += 1
            if prec == "*":
                prec = str(number(args[used] if used < len(args) else None, "d"))
                used += 1
            arg = args[used] if used < len(args) else None
            used += 1
            width = str(min(abs(int(width)), 10000)) if width and width.lstrip("-").isdigit() else ""
            prec = str(min(int(prec), 10000)) if prec and prec.isdigit() else ("0" if prec == "" else None)
            spec = "%" + flags + width + ("." + prec if prec is not None else "")
            if conv in "diouxX":
                out.append((spec + ("d" if conv in "iu" else conv)) % int(number(arg, conv)))
            elif conv in "fFeEgG":
                out.append((spec + conv) % float(number(arg, conv)))
            else:
                text = {"c": (arg or "")[:1], "b": _escapes(arg or "")[0], "q": _quote(arg or "")}.get(conv, arg or "")
                out.append((spec + "s") % text)
        out.append(_escapes(fmt[pos:], printf=True)[0])
        ctx.sim.tick()
        if used == 0 or used >= len(args):
            break
        args = args[used:]
    text = "".join(out)
    if var is not None:
        ctx.shell.setvar(var, text)
    else:
        ctx.out.write(text)
    return status


def _p_pwd(ctx, argv):
    ctx.out.write(ctx.cwd + "\n")
    return 0


_SIGNALS = ["HUP", "INT", "QUIT", "ILL", "TRAP", "ABRT", "BUS", "FPE", "KILL", "USR1", "SEGV", "USR2", "PIPE",
            "ALRM", "TERM", "STKFLT", "CHLD", "CONT", "STOP", "TSTP", "TTIN", "TTOU", "URG", "XCPU", "XFSZ",
            "VTALRM", "PROF", "WINCH", "IO", "PWR", "SYS"]
_HARMLESS_SIGNALS = {0, 17, 18, 19, 20, 21, 22, 23, 28}   # probe, CHLD, CONT, STOP, TSTP, TTIN, TTOU, URG, WINCH


def _signal_number(spec):
    if spec.isdigit():
        return int(spec) if int(spec) <= 64 else None
    name = spec.upper()
    name = name[3:] if name.startswith("SIG") else name
    return _SIGNALS.index(name) + 1 if name in _SIGNALS else None


def _p_kill(ctx, argv):
    """kill (bash builtin and /usr/bin/kill). A terminating signal to PID 1 (or -1) shuts the machine down."""
    usage = "usage: kill [-s sigspec | -n signum | -sigspec] pid | jobspec ... or kill -l [sigspec]"
    args, sig, spec = argv[1:], 15, None
    if args and args[0] in ("-l", "-L", "--list"):
        ctx.out.write("".join(f"{k + 1:2d}) SIG{name}\n" for k, name in enumerate(_SIGNALS)))
        return 0
    if args and args[0] in ("-s", "-n"):
        if len(args) < 2:
            ctx.fail("kill", f"{args[0]}: option requires an argument")
            return 2
        spec, args = args[1], args[2:]
    elif args and args[0].startswith("-") and len(args[0]) > 1 and args[0] != "--":
        spec, args = args[0][1:], args[1:]
    if spec is not None:
        sig = _signal_number(spec)
        if sig is None:
            ctx.fail("kill", f"{spec}: invalid signal specification")
            return 1
    if args and args[0] == "--":
        args = args[1:]
    if not args:
        ctx.fail("kill", usage)
        return 2
    status = 0
    for arg in args:
        if not re.fullmatch(r"-?\d+", arg):
            ctx.fail("kill", f"{arg}: no such job" if arg.startswith("%") else
                     f"{arg}: arguments must be process or job IDs")
            status = 1
            continue
        pid = int(arg)
        if pid in (1, -1):
            if sig not in _HARMLESS_SIGNALS:
                ctx.sim.machine_down()
        elif pid == 0 or (ctx.shell is not None and pid == ctx.shell.pid):
            if sig not in _HARMLESS_SIGNALS:
                raise _Exit(128 + sig)
        elif not 1 < pid <= ctx.sim.last_pid:
            ctx.fail("kill", f"({pid}) - No such process")
            status = 1
    return status


_UNARY_TESTS = {"-e", "-f", "-d", "-s", "-r", "-w", "-x", "-L", "-h", "-n", "-z", "-b", "-c", "-p", "-S", "-t",
                "-g", "-u", "-k", "-O", "-G", "-N", "-a"}
_BINARY_TESTS = {"=", "==", "!=", "<", ">", "-eq", "-ne", "-lt", "-le", "-gt", "-ge", "=~", "-nt", "-ot", "-ef"}


def _test_eval(ctx, toks, dbl=False, arith=None):
    """test / [ / [[ ]] on already expanded words; True or False, _Usage on a malformed expression."""
    fs, pos, nesting = ctx.sim.fs, 0, 0
    if not toks:
        return False
    and_op, or_op = ("&&", "||") if dbl else ("-a", "-o")

    def peek(k=0):
        return toks[pos + k] if pos + k < len(toks) else None

    def take():
        nonlocal pos
        pos += 1
        return toks[pos - 1]

    def num(text):
        if dbl and arith:
            return arith(text)
        try:
            return int(text.strip())
        except ValueError:
            raise _Usage(f"{text}: integer expression expected")

    def node_of(path, follow=True):
        try:
            return fs.walk(ctx.abspath(path), follow) if path else None
        except _FsErr:
            return None

    def unary(op, arg):
        if op in ("-n", "-z"):
            return (arg != "") == (op == "-n")
        node = node_of(arg, op not in ("-L", "-h"))
        if node is None or op == "-t":
            return False
        return {"-e": True, "-a": True, "-f": node.kind in ("file", "bin"), "-d": node.kind == "dir",
                "-L": node.kind == "link", "-h": node.kind == "link", "-s": node.size > 0, "-r": fs.can(node, 4),
                "-w": fs.can(node, 2), "-x": fs.can(node, 1), "-c": node.kind == "dev", "-O": node.owner == USER,
                "-G": node.owner == USER, "-k": bool(node.mode & 0o1000)}.get(op, False)

    def binary(a, op, b):
        if op in ("=", "=="):
            return _glob_match(b, a) if dbl else a == b
        if op == "!=":
            return not _glob_match(b, a) if dbl else a != b
        if op in ("<", ">"):
            return a < b if op == "<" else a > b
        if op == "=~":
            return _compile(_posix_re(b, True)).search(a) is not None
        if op in ("-nt", "-ot", "-ef"):
            x, y = node_of(a), node_of(b)
            if op == "-ef":
                return x is not None and x is y
            return x is not None and (y is None or (x.mtime > y.mtime if op == "-nt" else x.mtime < y.mtime))
        x, y = num(a), num(b)
        return {"-eq": x == y, "-ne": x != y, "-lt": x < y, "-le": x <= y, "-gt": x > y, "-ge": x >= y}[op]

    def primary():
        nonlocal nesting
        tok = peek()
        if tok is None:
            raise _Usage("argument expected")
        if tok == "(" and len(toks) - pos > 2:
            take()
            nesting += 1
            if nesting > 100:
                raise _Usage("expression nested too deeply")
            value = either()
            nesting -= 1
            if peek() != ")":
                raise _Usage("`)' expected")
            take()
            return value
        if peek(1) in _BINARY_TESTS and peek(2) is not None:
            a, op, b = take(), take(), take()
            return binary(a, op, b)
        if tok in _UNARY_TESTS and peek(1) is not None:
            take()
            return unary(tok, take())
        take()
        return tok != ""

    def negation():
        flip = False
        while peek() == "!" and peek(1) is not None:
            take()
            flip = not flip
        return primary() != flip

    def both():
        value = negation()
        while peek() == and_op:
            take()
            value = negation() and value
        return value

    def either():
        value = both()
        while peek() == or_op:
            take()
            value = both() or value
        return value

    result = either()
    if pos != len(toks):
        raise _Usage("too many arguments")
    return result


def _p_test(ctx, argv):
    name, args = basename(argv[0]), argv[1:]
    if name == "[":
        if not args or args[-1] != "]":
            ctx.fail("[", "missing `]'")
            return 2
        args = args[:-1]
    try:
        return 0 if _test_eval(ctx, args) else 1
    except _Usage as e:
        ctx.fail(name, str(e))
        return 2


def _p_bash(ctx, argv):
    """bash / sh: -c STRING, a script file, or a script on stdin; --login reads the profile files."""
    sim, kind = ctx.sim, "sh" if basename(argv[0]) in ("sh", "dash") else "bash"
    args, login, errexit, xtrace, command = list(argv[1:]), False, False, False, None
    while args and args[0][:1] in "-+" and args[0] not in ("-", "--", "+"):
        arg = args.pop(0)
        if arg == "--login":
            login = True
        elif arg in ("--norc", "--noprofile", "--posix", "--noediting", "--restricted", "--verbose"):
            pass
        elif arg.startswith("--") or arg[0] == "+":
            if arg[0] == "-":
                raise _Usage(f"{arg}: invalid option")
        else:
            for ch in arg[1:]:
                if ch == "c":
                    if not args:
                        raise _Usage("-c: option requires an argument")
                    command = args.pop(0)
                elif ch in "lexo":
                    login, errexit, xtrace = login or ch == "l", errexit or ch == "e", xtrace or ch == "x"
                    if ch == "o" and args:
                        args.pop(0)
                elif ch not in "isuvhBHEPTknfabm":
                    raise _Usage(f"-{ch}: invalid option")
    if args and args[0] == "--":
        args.pop(0)
    sh = _Shell(sim, kind, name=argv[0], cwd=ctx.cwd, environ=ctx.environ, io=ctx.io)
    sh.errexit, sh.xtrace = errexit, xtrace
    try:
        if login:
            sh.source_profiles()
        elif kind == "bash" and sh.vars.get("BASH_ENV"):
            sh.source_file(sh.expand_single(sh.vars["BASH_ENV"]))
        if command is not None:
            if args:
                sh.name, sh.args = args[0], args[1:]
            return sh.run_text(command)
        if args:
            script = args[0]
            path = _FS.norm(script, ctx.cwd)
            if "/" not in script and not sim.fs.exists(path):
                found = sim.path_lookup(script, sh.vars.get("PATH", ""), ctx.cwd, bits=4)
                path = found[0] if found else path
            sim.note_exec(path)
            try:
                text = _slurp(sim.open_read(path))
            except _FsErr as e:
                ctx.err.write(f"{argv[0]}: {script}: {e}\n")
                return 127 if "No such" in str(e) else 126
            if "\0" in text[:512]:
                ctx.err.write(f"{argv[0]}: {script}: cannot execute binary file\n")
                return 126
            sh.name, sh.args, sh.script = script, args[1:], True
            return sh.run_text(text)
        return sh.run_text(_slurp(ctx.stdin))
    except _Exit as e:
        return e.status
    except _Break:
        return sh.status


def _p_cat(ctx, argv):
    opts, names = _getopt(argv[1:], "nAbEesTuv", longs={"number": "n", "show-all": "A"})
    status, count = 0, 0
    for name in names or ["-"]:
        try:
            src = ctx.open(name)
        except _FsErr as e:
            ctx.fail("cat", f"{name}: {e}")
            status = 1
            continue
        if isinstance(src, _Infinite):
            while True:
                ctx.sim.tick()
                ctx.out.write(src.chunk)
        text = src.read()
        if "n" in opts:
            lines = text.splitlines(True)
            text = "".join(f"{count + k + 1:6d}\t{line}" for k, line in enumerate(lines))
            count += len(lines)
        ctx.out.write(text)
    return status


def _p_ls(ctx, argv):
    opts, names = _getopt(argv[1:], "laAdh1FRtrSinGpCc", longs={
        "all": "a", "almost-all": "A", "directory": "d", "human-readable": "h", "color": "G", "classify": "F"})
    fs, status, files, dirs = ctx.sim.fs, 0, [], []
    for name in names or ["."]:
        path = ctx.abspath(name)
        try:
            node = fs.walk(path, follow=False)
            if node.kind == "link" and (not ("l" in opts or "d" in opts) or name.endswith("/")):
                node = fs.walk(path)
        except _FsErr as e:
            ctx.fail("ls", f"cannot access '{name}': {e}")
            status = 2
            continue
        (dirs if node.kind == "dir" and "d" not in opts else files).append((name, node))
    lines, dirs = _ls_entries(files, opts) if files else [], sorted(dirs, key=lambda d: d[0])
    headers = len(files) + len(dirs) > 1 or "R" in opts
    while dirs:
        name, node = dirs.pop(0)
        ctx.sim.tick()
        if headers:
            lines.append(("\n" if lines else "") + f"{name}:")
        if not fs.can(node, 5):
            ctx.fail("ls", f"cannot open directory '{name}': Permission denied")
            status = 2
            continue
        entries = [(n, c) for n, c in node.children.items() if "a" in opts or "A" in opts or n[0] != "."]
        if "a" in opts:
            entries += [(".", node), ("..", fs.walk(_FS.norm(ctx.abspath(name) + "/..")))]
        if "l" in opts or "n" in opts:
            lines.append(f"total {sum(_blocks(c) for _, c in entries)}")
        lines += _ls_entries(entries, opts)
        if "R" in opts:   # recurse into subdirectories, in listing order, before the remaining operands
            subdirs = [(name.rstrip("/") + "/" + n, c) for n, c in sorted(entries, key=lambda e: e[0])
                       if c.kind == "dir" and n not in (".", "..")]
            dirs = subdirs + dirs
    ctx.out.write("".join(line + "\n" for line in lines))
    return status


def _ls_entries(entries, opts):
    key = ((lambda e: (-e[1].mtime, e[0])) if "t" in opts else (lambda e: (-e[1].size, e[0])) if "S" in opts
           else (lambda e: e[0]))
    entries = sorted(entries, key=key, reverse="r" in opts)

    def mark(node):
        if "F" in opts:
            return {"dir": "/", "link": "@"}.get(node.kind, "*" if node.mode & 0o111 and node.kind != "dev" else "")
        return "/" if "p" in opts and node.kind == "dir" else ""

    if "l" not in opts and "n" not in opts:
        return [name + mark(node) for name, node in entries]
    rows = []
    for name, node in entries:
        links = (2 + sum(c.kind == "dir" for c in node.children.values())) if node.kind == "dir" else max(
            node.nlink, 1)
        owner = ("1000" if "n" in opts else USER) if node.owner == USER else ("0" if "n" in opts else "root")
        when = _when(node)
        rows.append((_mode_string(node), str(links), owner, owner, _human(node.size) if "h" in opts
                     else str(node.size), f"{when:%b} {when.day:2d} {when:%H:%M}",
                     name + (" -> " + node.target if node.kind == "link" else mark(node))))
    w = [max(len(r[k]) for r in rows) for k in range(5)]
    return [f"{r[0]} {r[1]:>{w[1]}} {r[2]:<{w[2]}} {r[3]:<{w[3]}} {r[4]:>{w[4]}} {r[5]} {r[6]}" for r in rows]


def _head_tail(ctx, argv):
    prog = basename(argv[0])
    args = ["-n" + a[1:] if re.fullmatch(r"-\d+", a) else a for a in argv[1:]]
    opts, names = _getopt(args, "qvf" if prog == "tail" else "qv", valued="nc",
                          longs={"lines": "n", "bytes": "c", "follow": "f", "quiet": "q"})
    spec = str(opts.get("c") or opts.get("n") or "10")
    m = re.fullmatch(r"([+-]?)(\d+)", spec)
    if not m:
        ctx.fail(prog, f"invalid number of {'bytes' if 'c' in opts else 'lines'}: '{spec}'")
        return 1
    sign, k, status = m.group(1), int(m.group(2)), 0
    for idx, name in enumerate(names or ["-"]):
        try:
            src = ctx.open(name)
        except _FsErr as e:
            ctx.fail(prog, f"cannot open '{name}' for reading: {e}")
            status = 1
            continue
        if isinstance(src, _Infinite):
            if prog == "tail":
                src.read()
            text = src.chunk * 16
        else:
            text = src.read()
        if (len(names) > 1 and "q" not in opts) or "v" in opts:
            ctx.out.write(("\n" if idx else "") + f"==> {name} <==\n")
        units = text if "c" in opts else text.splitlines(True)
        if prog == "head":
            units = units[:-k] if sign == "-" else units[:k]
        else:
            units = units[max(k - 1, 0):] if sign == "+" else units[-k:] if k else units[:0]
        ctx.out.write(units if isinstance(units, str) else "".join(units))
    if "f" in opts:
        _Infinite(ctx.sim, "").read()
    return status


def _p_grep(ctx, argv):
    args, pats, rest = [], [], list(argv[1:])
    while rest:
        arg = rest.pop(0)
        if arg in ("-e", "--regexp"):
            pats.append(rest.pop(0) if rest else "")
        elif arg.startswith("--regexp="):
            pats.append(arg[9:])
        elif arg == "--":
            args.append("--")
            args.extend(rest)
            break
        else:
            args.append(arg)
    opts, names = _getopt(args, "nvicilLrRFEoqwxsHhaIPZz", longs={
        "ignore-case": "i", "recursive": "r", "count": "c", "invert-match": "v", "line-number": "n", "quiet": "q",
        "silent": "q", "files-with-matches": "l", "color": "Z", "colour": "Z", "extended-regexp": "E",
        "fixed-strings": "F", "word-regexp": "w", "line-regexp": "x", "only-matching": "o", "no-messages": "s",
        "with-filename": "H", "no-filename": "h", "include": "%", "exclude": "^"})
    if not pats:
        if not names:
            ctx.err.write("Usage: grep [OPTION]... PATTERNS [FILE]...\n")
            return 2
        pats = names.pop(0).split("\n")
    ere = "E" in opts or "P" in opts or basename(argv[0]) == "egrep"
    parts = [re.escape(p) if "F" in opts else _posix_re(p, ere) for p in pats]
    if "w" in opts:
        parts = [rf"(?<!\w)(?:{p})(?!\w)" for p in parts]
    if "x" in opts:
        parts = [rf"^(?:{p})$" for p in parts]
    rx = _compile("|".join(f"(?:{p})" for p in parts), re.I if "i" in opts else 0)
    recursive, status, targets = "r" in opts or "R" in opts, 0, []
    for name in names or (["."] if recursive else ["-"]):
        if name == "-":
            targets.append(("(standard input)", ctx.stdin))
            continue
        try:
            node = ctx.sim.fs.walk(ctx.abspath(name))
        except _FsErr as e:
            if "s" not in opts:
                ctx.fail("grep", f"{name}: {e}")
            status = 2
            continue
        if node.kind != "dir":
            targets.append((name, None))
        elif not recursive:
            ctx.fail("grep", f"{name}: Is a directory")
            status = 2
        else:
            for disp, sub, _ in _walk_tree(ctx, "grep", name, node):
                if sub.kind not in ("dir", "link", "dev") and (
                        "%" not in opts or _glob_match(str(opts["%"]), basename(disp))):
                    targets.append((disp, None))
    show = ("H" in opts or len(targets) > 1 or recursive) and "h" not in opts
    matched = False
    for name, src in targets:
        try:
            text = _slurp(src if src is not None else ctx.open(name))
        except _FsErr as e:
            if "s" not in opts:
                ctx.fail("grep", f"{name}: {e}")
            status = 2
            continue
        binary, count, prefix = "\0" in text, 0, f"{name}:" if show else ""
        for k, line in enumerate(_lines(text)):
            if (rx.search(line) is not None) == ("v" in opts):
                continue
            count += 1
            if "q" in opts:
                return 0
            if binary or "c" in opts or "l" in opts or "L" in opts:
                continue
            num = f"{k + 1}:" if "n" in opts else ""
            if "o" in opts and "v" not in opts:
                ctx.out.write("".join(f"{prefix}{num}{m.group()}\n" for m in rx.finditer(line) if m.group()))
            else:
                ctx.out.write(f"{prefix}{num}{line}\n")
        matched = matched or count > 0
        if "c" in opts:
            ctx.out.write(f"{prefix}{count}\n")
        elif "l" in opts or "L" in opts:
            if bool(count) == ("l" in opts):
                ctx.out.write(name + "\n")
        elif binary and count:
            ctx.out.write(f"Binary file {name} matches\n")
    return 2 if status and not matched else 0 if matched else 1


def _byte_count(text):
    """Characters below 256 stand for raw bytes (binary files, /dev/urandom); others are UTF-8 text."""
    try:
        return len(text.encode("latin-1"))
    except UnicodeEncodeError:
        return len(text.encode("utf-8", "replace"))


def _p_wc(ctx, argv):
    opts, names = _getopt(argv[1:], "lcwmL", longs={"lines": "l", "bytes": "c", "words": "w", "chars": "m"})
    keys = [k for k in "lwmc" if k in opts] or ["l", "w", "c"]
    items, status = _inputs(ctx, "wc", names)
    count = {"l": lambda t: t.count("\n"), "w": lambda t: len(t.split()), "m": len,
             "c": _byte_count}
    rows = [([count[k](text) for k in keys], name) for name, text in items]
    if len(rows) > 1:
        rows.append(([sum(r[0][i] for r in rows) for i in range(len(keys))], "total"))
    width = max([len(str(v)) for vals, _ in rows for v in vals] + [1])
    if len(keys) > 1 and any(name == "-" for _, name in rows):
        width = max(width, 7)
    for vals, name in rows:
        ctx.out.write(" ".join(f"{v:>{width}}" for v in vals) + ("" if name == "-" else " " + name) + "\n")
    return status


def _file_kind(fs, node):
    if node.kind == "dir":
        return "directory"
    if node.kind == "link":
        return f"symbolic link to {node.target}"
    if node.kind == "dev":
        return "character special (1/3)"
    if not fs.can(node, 4):
        return "regular file, no read permission"
    if node.kind == "bin":
        return ("ELF 64-bit LSB pie executable, x86-64, version 1 (SYSV), dynamically linked, interpreter "
                "/lib64/ld-linux-x86-64.so.2, stripped")
    text = node.content
    if not text:
        return "empty"
    if "\0" in text:
        return "data"
    suffix = ", ASCII text" + (" executable" if node.mode & 0o111 else "")
    if text.startswith("#!"):
        interp = text[2:].split("\n", 1)[0].strip()
        name = "Bourne-Again shell script" if "bash" in interp else "POSIX shell script" if interp.endswith(
            "sh") else f"a {interp} script"
        return name + suffix
    return "ASCII text"


def _p_file(ctx, argv):
    opts, names = _getopt(argv[1:], "bLhiz")
    if not names:
        raise _Usage("Usage: file [-bchikLlNnprsSvzZ0] [--apple] [--extension] [--mime-encoding] file ...")
    for name in names:
        try:
            desc = _file_kind(ctx.sim.fs, ctx.sim.fs.walk(ctx.abspath(name), follow="L" in opts))
        except _FsErr as e:
            desc = f"cannot open `{name}' ({e})"
        ctx.out.write(desc + "\n" if "b" in opts else f"{name}: {desc}\n")
    return 0


def _p_stat(ctx, argv):
    opts, names = _getopt(argv[1:], "Lt", valued="c", longs={"format": "c", "dereference": "L"})
    if not names:
        raise _Usage("missing operand")
    status = 0
    for name in names:
        try:
            node = ctx.sim.fs.walk(ctx.abspath(name), follow="L" in opts)
        except _FsErr as e:
            ctx.fail("stat", f"cannot statx '{name}': {e}")
            status = 1
            continue
        kind = {"dir": "directory", "link": "symbolic link", "dev": "character special file"}.get(
            node.kind, "regular file" if node.size else "regular empty file")
        uid, owner = ("1000", USER) if node.owner == USER else ("0", "root")
        when = f"{_when(node):%Y-%m-%d %H:%M:%S}.000000000 +0000"
        links = max(node.nlink, 1)
        if "c" in opts:
            fields = {"n": name, "a": f"{node.mode & 0o7777:o}", "A": _mode_string(node), "U": owner, "G": owner,
                      "u": uid, "g": uid, "s": str(node.size), "F": kind, "i": str(node.ino), "h": str(links),
                      "y": when, "x": when, "z": when, "%": "%", "b": str(_blocks(node) * 2), "o": "4096"}
            ctx.out.write(re.sub(r"%(.)", lambda m: fields.get(m.group(1), m.group()), str(opts["c"])) + "\n")
            continue
        shown = name + (f" -> {node.target}" if node.kind == "link" else "")
        ctx.out.write(f"  File: {shown}\n  Size: {node.size:<10}\tBlocks: {_blocks(node) * 2:<10} IO Block: 4096"
                      f"   {kind}\nDevice: 0,52\tInode: {node.ino:<11} Links: {links}\n"
                      f"Access: ({node.mode & 0o7777:04o}/{_mode_string(node)})  Uid: ({uid:>5}/{owner:>8})   "
                      f"Gid: ({uid:>5}/{owner:>8})\nAccess: {when}\nModify: {when}\nChange: {when}\n Birth: -\n")
    return status


def _p_which(ctx, argv):
    opts, names = _getopt(argv[1:], "as")
    status = 0
    for name in names:
        if "/" in name:
            found = [name] if ctx.sim.path_lookup(basename(name), _FS.norm(name, ctx.cwd).rsplit("/", 1)[0] or "/",
                                                  "/") else []
        else:
            found = ctx.sim.path_lookup(name, ctx.environ.get("PATH", ""), ctx.cwd, every="a" in opts)
        ctx.out.write("".join(p + "\n" for p in found))
        status = status or (0 if found else 1)
    return status


def _p_id(ctx, argv):
    prog, args = basename(argv[0]), "".join(argv[1:])
    if prog == "whoami" or (prog == "id" and "u" in args and "n" in args):
        ctx.out.write(USER + "\n")
    elif prog == "groups" or (prog == "id" and ("g" in args or "G" in args) and "n" in args):
        ctx.out.write(USER + "\n")
    elif prog == "id" and ("u" in args or "g" in args or "G" in args):
        ctx.out.write("1000\n")
    else:
        ctx.out.write("uid=1000(user) gid=1000(user) groups=1000(user)\n")
    return 0


def _p_uname(ctx, argv):
    flags = "".join(a.lstrip("-") for a in argv[1:]) or "s"
    if "a" in flags:
        ctx.out.write("Linux sandbox 6.1.0-18-amd64 #1 SMP PREEMPT_DYNAMIC Debian 6.1.76-1 (2024-02-01) x86_64 "
                      "GNU/Linux\n")
        return 0
    parts = {"s": "Linux", "n": "sandbox", "r": "6.1.0-18-amd64", "m": "x86_64", "o": "GNU/Linux"}
    ctx.out.write(" ".join(parts[f] for f in "snrmo" if f in flags) + "\n")
    return 0


def _p_hostname(ctx, argv):
    ctx.out.write("sandbox\n")
    return 0


def _p_env(ctx, argv):
    args, environ = list(argv[1:]), dict(ctx.environ)
    while args:
        arg = args[0]
        if arg in ("-i", "-", "--ignore-environment"):
            environ, args = {}, args[1:]
        elif arg in ("-u", "--unset") and len(args) > 1:
            environ.pop(args[1], None)
            args = args[2:]
        elif arg == "--":
            args = args[1:]
            break
        elif "=" in arg and not arg.startswith("="):
            key, _, value = arg.partition("=")
            environ[key] = value
            args = args[1:]
        elif arg.startswith("-"):
            raise _Usage(f"invalid option -- '{arg[1:2]}'")
        else:
            break
    if not args:
        ctx.out.write("".join(f"{k}={v}\n" for k, v in environ.items()))
        return 0
    return ctx.sim.spawn(Ctx(ctx.sim, ctx.io, ctx.cwd, environ), args, "env")


def _p_printenv(ctx, argv):
    names = [a for a in argv[1:] if not a.startswith("-")]
    if not names:
        ctx.out.write("".join(f"{k}={v}\n" for k, v in ctx.environ.items()))
        return 0
    values = [ctx.environ[n] for n in names if n in ctx.environ]
    ctx.out.write("".join(v + "\n" for v in values))
    return 0 if len(values) == len(names) else 1


def _p_ps(ctx, argv):
    sim, flags = ctx.sim, "".join(argv[1:])
    me = sim.new_pid()
    procs = [(1, 0, "sleep infinity"), (sim.login_pid, 0, "/bin/bash --login"), (me, sim.login_pid, " ".join(argv))]
    if "u" in flags:
        lines = ["USER         PID %CPU %MEM    VSZ   RSS TTY      STAT START   TIME COMMAND"]
        lines += [f"{USER:<10} {pid:>5}  0.0  0.0   4364  3200 ?        S    12:00   0:00 {cmd}"
                  for pid, _, cmd in procs]
    elif "f" in flags:
        lines = ["UID          PID    PPID  C STIME TTY          TIME CMD"]
        lines += [f"{USER:<8} {pid:>7} {ppid:>7}  0 12:00 ?        00:00:00 {cmd}" for pid, ppid, cmd in procs]
    else:
        lines = ["    PID TTY          TIME CMD"]
        lines += [f"{pid:>7} ?        00:00:00 {basename(cmd.split()[0])}" for pid, _, cmd in procs]
    ctx.out.write("\n".join(lines) + "\n")
    return 0


def _p_sleep(ctx, argv):
    if len(argv) < 2:
        raise _Usage("missing operand")
    total = 0.0
    for arg in argv[1:]:
        m = re.fullmatch(r"(\d+(?:\.\d*)?|\.\d+|inf|infinity)([smhd]?)", arg)
        if not m:
            ctx.fail("sleep", f"invalid time interval '{arg}'")
            return 1
        total += float(m.group(1)) * {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}[m.group(2)]
    ctx.sim.sleep(total)
    return 0


def _p_date(ctx, argv):
    now = BASE_TIME + datetime.timedelta(seconds=int(ctx.sim.now()))
    fmt = next((a[1:] for a in argv[1:] if a.startswith("+")), None)
    if fmt is None:
        ctx.out.write(f"{now:%a %b} {now.day:2d} {now:%H:%M:%S} UTC {now:%Y}\n")
        return 0
    epoch = str(int((now - datetime.datetime(1970, 1, 1)).total_seconds()))
    fmt = re.sub(r"%([sNZz])", lambda m: {"s": epoch, "N": "000000000", "Z": "UTC", "z": "+0000"}[m.group(1)], fmt)
    try:
        ctx.out.write(now.strftime(fmt) + "\n")
    except (ValueError, UnicodeError):
        ctx.out.write(fmt + "\n")
    return 0


def _p_mkdir(ctx, argv):
    opts, names = _getopt(argv[1:], "pv", valued="m", longs={"parents": "p"})
    if not names:
        raise _Usage("missing operand")
    fs, status = ctx.sim.fs, 0
    for name in names:
        path = ctx.abspath(name)
        parts = path.split("/")[1:]
        steps = ["/" + "/".join(parts[:k]) for k in range(1, len(parts) + 1)] if "p" in opts else [path]
        for step in steps:
            try:
                if fs.exists(step):
                    if step == path and "p" not in opts:
                        raise _FsErr("File exists")
                    continue
                dirnode, base = fs.parent(step)
                if not fs.can(dirnode, 3):
                    raise _FsErr("Permission denied")
                mode = int(opts["m"], 8) if "m" in opts and re.fullmatch(r"[0-7]{1,4}", str(opts["m"])) else (
                    0o777 & ~ctx.sim.umask)
                fs.add(dirnode, base, fs.new("dir", mode, USER))
            except _FsErr as e:
                ctx.fail("mkdir", f"cannot create directory '{name}': {e}")
                status = 1
                break
    return status


def _p_rmdir(ctx, argv):
    opts, names = _getopt(argv[1:], "pv")
    fs, status = ctx.sim.fs, 0
    for name in names:
        try:
            path = ctx.abspath(name)
            node = fs.walk(path, follow=False)
            if node.kind != "dir":
                raise _FsErr("Not a directory")
            if node.children:
                raise _FsErr("Directory not empty")
            dirnode, base = fs.parent(path)
            if not fs.can(dirnode, 3):
                raise _FsErr("Permission denied")
            fs.unlink(dirnode, base)
        except _FsErr as e:
            ctx.fail("rmdir", f"failed to remove '{name}': {e}")
            status = 1
    return status


def _p_touch(ctx, argv):
    opts, names = _getopt(argv[1:], "acmh", valued="dtr")
    fs, status = ctx.sim.fs, 0
    for name in names:
        path = ctx.abspath(name)
        try:
            try:
                node = fs.walk(path)
            except _FsErr as e:
                if str(e) != "No such file or directory" or "c" in opts:
                    if "c" in opts:
                        continue
                    raise
                dirnode, base = fs.parent(path)
                if not fs.can(dirnode, 3):
                    raise _FsErr("Permission denied")
                fs.add(dirnode, base, fs.new("file", 0o666 & ~ctx.sim.umask, USER))
                continue
            if node.owner != USER and not fs.can(node, 2):
                raise _FsErr("Permission denied")
            node.mtime = ctx.sim.now()
        except _FsErr as e:
            ctx.fail("touch", f"cannot touch '{name}': {e}")
            status = 1
    return status


def _p_rm(ctx, argv):
    opts, names = _getopt(argv[1:], "rRfidvI", longs={
        "recursive": "r", "force": "f", "no-preserve-root": "N", "preserve-root": "P", "verbose": "v", "dir": "d",
        "interactive": "i"})
    recursive, force = "r" in opts or "R" in opts, "f" in opts
    if not names and not force:
        raise _Usage("missing operand")
    status = 0
    for name in names:
        path = ctx.abspath(name)
        if basename(name) in (".", ".."):
            ctx.fail("rm", f"refusing to remove '.' or '..' directory: skipping '{name}'")
            status = 1
            continue
        if path == "/" and recursive and "N" not in opts:
            ctx.fail("rm", "it is dangerous to operate recursively on '/'")
            ctx.fail("rm", "use --no-preserve-root to override this failsafe")
            status = 1
            continue
        try:
            node = ctx.sim.fs.walk(path, follow=False)
        except _FsErr as e:
            if not (force and str(e) == "No such file or directory"):
                ctx.fail("rm", f"cannot remove '{name}': {e}")
                status = 1
            continue
        if node.kind == "dir" and not recursive and not ("d" in opts and not node.children):
            ctx.fail("rm", f"cannot remove '{name}': Is a directory")
            status = 1
            continue
        status |= _remove(ctx, name, path, node)
    return status


def _remove(ctx, disp, path, node, depth=0):
    fs, status = ctx.sim.fs, 0
    ctx.sim.tick()
    if node.kind == "dir":
        if not fs.can(node, 5):
            ctx.fail("rm", f"cannot remove '{disp}': Permission denied")
            return 1
        if depth < 100:
            for name in sorted(node.children):
                child = node.children.get(name)
                if child is not None:
                    status |= _remove(ctx, disp.rstrip("/") + "/" + name, path.rstrip("/") + "/" + name, child,
                                      depth + 1)
        if status:
            return status
    try:
        dirnode, name = fs.parent(path)
        if not fs.can(dirnode, 3):
            raise _FsErr("Permission denied")
        if dirnode.mode & 0o1000 and node.owner != USER and dirnode.owner != USER:
            raise _FsErr("Operation not permitted")
        if node.kind == "dir" and node.children:
            raise _FsErr("Directory not empty")
        fs.unlink(dirnode, name)
    except _FsErr as e:
        ctx.fail("rm", f"cannot remove '{disp}': {e}")
        return 1
    return 0


def _targets(ctx, prog, names):
    """mv/cp/ln operands: [(source, target display path)] or None after printing an error."""
    if len(names) < 2:
        raise _Usage("missing file operand" if not names else f"missing destination file operand after '{names[0]}'")
    *sources, dest = names
    try:
        into = ctx.sim.fs.walk(ctx.abspath(dest)).kind == "dir"
    except _FsErr:
        into = False
    if len(sources) > 1 and not into:
        ctx.fail(prog, f"target '{dest}' is not a directory")
        return None
    return [(src, dest.rstrip("/") + "/" + basename(src) if into else dest) for src in sources]


def _p_mv(ctx, argv):
    opts, names = _getopt(argv[1:], "fivnTu", longs={"force": "f", "no-clobber": "n", "verbose": "v"})
    pairs, fs, status = _targets(ctx, "mv", names), ctx.sim.fs, 0
    if pairs is None:
        return 1
    for src, dest in pairs:
        spath, tpath = ctx.abspath(src), ctx.abspath(dest)
        try:
            node = fs.walk(spath, follow=False)
        except _FsErr as e:
            ctx.fail("mv", f"cannot stat '{src}': {e}")
            status = 1
            continue
        if tpath == spath:
            ctx.fail("mv", f"'{src}' and '{dest}' are the same file")
            status = 1
            continue
        if node.kind == "dir" and tpath.startswith(spath + "/"):
            ctx.fail("mv", f"cannot move '{src}' to a subdirectory of itself, '{dest}'")
            status = 1
            continue
        try:
            sdir, sname = fs.parent(spath)
            tdir, tname = fs.parent(tpath)
            if not fs.can(sdir, 3) or not fs.can(tdir, 3):
                raise _FsErr("Permission denied")
            if sdir.mode & 0o1000 and node.owner != USER and sdir.owner != USER:
                raise _FsErr("Operation not permitted")
            old = tdir.children.get(tname)
            if old is not None:
                if old.kind == "dir" and node.kind != "dir":
                    ctx.fail("mv", f"cannot overwrite directory '{dest}' with non-directory")
                    status = 1
                    continue
                if old.kind == "dir" and old.children:
                    raise _FsErr("Directory not empty")
                if "n" in opts:
                    continue
                fs.unlink(tdir, tname)
            del sdir.children[sname]
            tdir.children[tname] = node
            sdir.mtime = tdir.mtime = ctx.sim.now()
        except _FsErr as e:
            ctx.fail("mv", f"cannot move '{src}' to '{dest}': {e}")
            status = 1
    return status


def _p_cp(ctx, argv):
    opts, names = _getopt(argv[1:], "rRafpivnuLPdTl", longs={
        "recursive": "r", "force": "f", "archive": "a", "preserve": "p", "verbose": "v", "no-clobber": "n"})
    recursive, keep = bool(opts.keys() & {"r", "R", "a"}), bool(opts.keys() & {"p", "a"})
    pairs, status = _targets(ctx, "cp", names), 0
    if pairs is None:
        return 1
    for src, dest in pairs:
        try:
            node = ctx.sim.fs.walk(ctx.abspath(src))
        except _FsErr as e:
            ctx.fail("cp", f"cannot stat '{src}': {e}")
            status = 1
            continue
        if node.kind == "dir" and not recursive:
            ctx.fail("cp", f"-r not specified; omitting directory '{src}'")
            status = 1
        elif ctx.abspath(src) == ctx.abspath(dest):
            ctx.fail("cp", f"'{src}' and '{dest}' are the same file")
            status = 1
        else:
            status |= _copy(ctx, src, node, dest, ctx.abspath(dest), keep)
    return status


def _copy(ctx, sdisp, node, tdisp, tpath, keep, depth=0):
    fs = ctx.sim.fs
    ctx.sim.tick()
    try:
        existing = fs.walk(tpath)
    except _FsErr:
        existing = None
    try:
        if node.kind == "dir":
            if existing is None:
                dirnode, name = fs.parent(tpath)
                if not fs.can(dirnode, 3):
                    raise _FsErr("Permission denied")
                existing = fs.new("dir", node.mode if keep else 0o755, USER)
                fs.add(dirnode, name, existing)
            elif existing.kind != "dir":
                ctx.fail("cp", f"cannot overwrite non-directory '{tdisp}' with directory '{sdisp}'")
                return 1
            if not fs.can(node, 5):
                raise _FsErr("Permission denied")
            status = 0
            for name in sorted(node.children) if depth < 100 else []:
                child = node.children[name]
                if child is not existing:
                    status |= _copy(ctx, sdisp + "/" + name, child, tdisp + "/" + name, tpath + "/" + name, keep,
                                    depth + 1)
            return status
        if not fs.can(node, 4):
            ctx.fail("cp", f"cannot open '{sdisp}' for reading: Permission denied")
            return 1
        text = "" if node.kind in ("bin", "link") else _slurp(ctx.sim.node_stream(node))
        if existing is not None:
            if existing.kind == "dir":
                ctx.fail("cp", f"cannot overwrite directory '{tdisp}' with non-directory")
                return 1
            if not fs.can(existing, 2):
                raise _FsErr("Permission denied")
            target = existing
        else:
            dirnode, name = fs.parent(tpath)
            if not fs.can(dirnode, 3):
                raise _FsErr("Permission denied")
            target = fs.new("file", (node.mode if keep else node.mode & ~ctx.sim.umask) & 0o7777, USER)
            fs.add(dirnode, name, target)
        fs.set_content(target, text)
        if node.kind in ("bin", "link"):
            target.kind, target.prog, target.target, target.bin_size = node.kind, node.prog, node.target, \
                node.bin_size
        return 0
    except _FsErr as e:
        ctx.fail("cp", f"cannot create {'directory' if node.kind == 'dir' else 'regular file'} '{tdisp}': {e}")
        return 1
    except _WriteFailed as e:
        ctx.fail("cp", f"error writing '{tdisp}': {e}")
        return 1


def _p_ln(ctx, argv):
    opts, names = _getopt(argv[1:], "sfnvrT", longs={"symbolic": "s", "force": "f"})
    if len(names) == 1:
        names.append(".")
    pairs, fs, status = _targets(ctx, "ln", names), ctx.sim.fs, 0
    for target, link in pairs or []:
        try:
            if "s" in opts:
                node = fs.new("link", 0o777, USER, target=target)
            else:
                node = fs.walk(ctx.abspath(target), follow=False)
                if node.kind == "dir":
                    raise _FsErr("hard link not allowed for directory")
                if node.owner != USER and not fs.can(node, 6):
                    raise _FsErr("Operation not permitted")
            dirnode, name = fs.parent(ctx.abspath(link))
            if not fs.can(dirnode, 3):
                raise _FsErr("Permission denied")
            if name in dirnode.children:
                if "f" not in opts:
                    raise _FsErr("File exists")
                fs.unlink(dirnode, name)
            fs.add(dirnode, name, node)
        except _FsErr as e:
            ctx.fail("ln", f"failed to create {'symbolic' if 's' in opts else 'hard'} link '{link}': {e}")
            status = 1
    return status if pairs is not None else 1


def _apply_mode(spec, mode, is_dir, umask):
    """chmod's mode: octal or symbolic clauses like u+x,go-w,a=r; None if invalid."""
    if re.fullmatch(r"[0-7]{1,4}", spec):
        return int(spec, 8)
    for clause in spec.split(","):
        m = re.fullmatch(r"([ugoa]*)([-+=])([rwxXst]*)", clause)
        if not m:
            return None
        who, op, perms = m.groups()
        shifts = [s for w, s in (("u", 6), ("g", 3), ("o", 0)) if not who or "a" in who or w in who]
        bits = 0
        for p in perms:
            if p in "rwxX" and not (p == "X" and not (is_dir or mode & 0o111)):
                bits |= sum({"r": 4, "w": 2, "x": 1, "X": 1}[p] << s for s in shifts)
            elif p == "t":
                bits |= 0o1000
            elif p == "s":
                bits |= (0o4000 if 6 in shifts else 0) | (0o2000 if 3 in shifts else 0)
        if not who:
            bits &= ~umask
        if op == "+":
            mode |= bits
        elif op == "-":
            mode &= ~bits
        else:
            mode = (mode & ~sum(7 << s for s in shifts)) | bits
    return mode


def _p_chmod(ctx, argv):
    recursive, spec, names = False, None, []
    for arg in argv[1:]:
        if arg in ("-R", "--recursive"):
            recursive = True
        elif arg in ("-v", "-c", "-f", "--verbose", "--changes", "--silent", "--quiet"):
            pass
        elif spec is None and (not arg.startswith("-") or re.fullmatch(r"-[rwxXst]+", arg)):
            spec = arg
        elif arg.startswith("-"):
            raise _Usage(f"invalid option -- '{arg[1:2]}'")
        else:
            names.append(arg)
    if spec is None or not names:
        raise _Usage("missing operand" if spec is None else f"missing operand after '{spec}'")
    fs, status = ctx.sim.fs, 0
    for name in names:
        try:
            node = fs.walk(ctx.abspath(name))
        except _FsErr as e:
            ctx.fail("chmod", f"cannot access '{name}': {e}")
            status = 1
            continue
        for disp, sub, _ in (_walk_tree(ctx, "chmod", name, node) if recursive else [(name, node, 0)]):
            if sub.kind == "link":
                continue
            if sub.owner != USER:
                ctx.fail("chmod", f"changing permissions of '{disp}': Operation not permitted")
                status = 1
                continue
            new = _apply_mode(spec, sub.mode, sub.kind == "dir", ctx.sim.umask)
            if new is None:
                ctx.fail("chmod", f"invalid mode: '{spec}'")
                return 1
            sub.mode = new
    return status


def _p_chown(ctx, argv):
    opts, names = _getopt(argv[1:], "Rvfch", longs={"recursive": "R"})
    if len(names) < 2:
        raise _Usage("missing operand")
    spec, files = names[0], names[1:]
    owner = re.split(r"[:.]", spec)[0]
    if owner and owner not in ("root", USER, "0", "1000"):
        ctx.fail(basename(argv[0]), f"invalid user: '{spec}'")
        return 1
    status = 0
    for name in files:
        try:
            node = ctx.sim.fs.walk(ctx.abspath(name))
        except _FsErr as e:
            ctx.fail(basename(argv[0]), f"cannot access '{name}': {e}")
            status = 1
            continue
        if node.owner != USER or owner not in ("", USER, "1000"):
            ctx.fail(basename(argv[0]), f"changing ownership of '{name}': Operation not permitted")
            status = 1
    return status


def _p_basename(ctx, argv):
    args = [a for a in argv[1:] if a not in ("-a", "--")]
    if not args:
        raise _Usage("missing operand")
    if basename(argv[0]) == "dirname":
        for path in args:
            head = path.rstrip("/").rsplit("/", 1)[0] if "/" in path.rstrip("/") else "."
            ctx.out.write((head.rstrip("/") or "/") + "\n")
        return 0
    name = basename(args[0])
    if len(args) > 1 and name.endswith(args[1]) and name != args[1]:
        name = name[:-len(args[1])]
    ctx.out.write(name + "\n")
    return 0


def _p_seq(ctx, argv):
    args, sep = list(argv[1:]), "\n"
    while args and args[0] in ("-s", "-w") or (args and args[0].startswith("-s") and len(args[0]) > 2):
        arg = args.pop(0)
        if arg == "-s" and args:
            sep = args.pop(0)
        elif arg.startswith("-s") and len(arg) > 2:
            sep = arg[2:]
    try:
        nums = [float(a) if "." in a else int(a) for a in args]
    except ValueError:
        raise _Usage(f"invalid floating point argument: '{args[0] if args else ''}'")
    if not 1 <= len(nums) <= 3:
        raise _Usage("missing operand" if not nums else f"extra operand '{args[3]}'")
    first, step, last = (1, 1, nums[0]) if len(nums) == 1 else (nums[0], 1, nums[1]) if len(nums) == 2 else nums
    if step == 0:
        raise _Usage(f"invalid Zero increment value: '{args[1]}'")
    value, out = first, []
    while (value <= last) if step > 0 else (value >= last):
        out.append(f"{value:g}" if isinstance(value, float) else str(value))
        value += step
        if len(out) >= 50:
            ctx.sim.tick()
            ctx.out.write(sep.join(out) + sep)
            out = []
    if out:
        ctx.out.write(sep.join(out) + "\n")
    return 0


def _p_sort(ctx, argv):
    opts, names = _getopt(argv[1:], "rnufbdhVs", valued="kto", longs={"reverse": "r", "numeric-sort": "n",
                                                                     "unique": "u"})
    items, status = _inputs(ctx, "sort", names)
    lines = [line for _, text in items for line in _lines(text)]
    field = int(re.match(r"\d+", str(opts.get("k", "0"))).group() or 0) if "k" in opts and re.match(
        r"\d+", str(opts["k"])) else 0

    def key(line):
        text = (line.split(opts["t"]) if "t" in opts else line.split())[field - 1:] if field else [line]
        text = " ".join(text) if not isinstance(text, str) else text
        if "f" in opts:
            text = text.lower()
        if "n" in opts:
            m = re.match(r"\s*(-?\d+(\.\d+)?)", text)
            return (float(m.group(1)) if m else 0.0, text)
        return (0.0, text)

    lines.sort(key=key, reverse="r" in opts)
    if "u" in opts:
        lines = [l for k, l in enumerate(lines) if k == 0 or key(l) != key(lines[k - 1])]
    text = "".join(l + "\n" for l in lines)
    if "o" in opts:
        ctx.sim.open_write(str(opts["o"]), ctx.cwd, False, ctx.io).write(text)
    else:
        ctx.out.write(text)
    return status


def _p_uniq(ctx, argv):
    opts, names = _getopt(argv[1:], "cdui")
    items, status = _inputs(ctx, "uniq", names[:1])
    groups = []
    for line in _lines(items[0][1] if items else ""):
        same = groups and (groups[-1][0].lower() == line.lower() if "i" in opts else groups[-1][0] == line)
        if same:
            groups[-1][1] += 1
        else:
            groups.append([line, 1])
    for line, count in groups:
        if ("d" in opts and count < 2) or ("u" in opts and count > 1):
            continue
        ctx.out.write(f"{count:7d} {line}\n" if "c" in opts else line + "\n")
    return status


def _tr_set(spec):
    spec, out, i = _escapes(spec, printf=True)[0], [], 0
    classes = {"lower": "abcdefghijklmnopqrstuvwxyz", "upper": "ABCDEFGHIJKLMNOPQRSTUVWXYZ", "digit": "0123456789",
               "space": " \t\n\r\f\v", "blank": " \t"}
    classes["alpha"] = classes["lower"] + classes["upper"]
    classes["alnum"] = classes["alpha"] + classes["digit"]
    while i < len(spec) and len(out) < 10000:
        m = re.match(r"\[:(\w+):\]", spec[i:])
        if m and m.group(1) in classes:
            out.extend(classes[m.group(1)])
            i += m.end()
        elif i + 2 < len(spec) and spec[i + 1] == "-" and spec[i] <= spec[i + 2]:
            out.extend(chr(c) for c in range(ord(spec[i]), min(ord(spec[i + 2]), ord(spec[i]) + 10000) + 1))
            i += 3
        else:
            out.append(spec[i])
            i += 1
    return out


def _p_tr(ctx, argv):
    opts, sets = _getopt(argv[1:], "dscC")
    if not sets or (len(sets) < 2 and "d" not in opts and "s" not in opts):
        raise _Usage("missing operand")
    text = _slurp(ctx.stdin)
    first = _tr_set(sets[0])
    if "d" in opts:
        drop = set(first)
        text = "".join(c for c in text if (c in drop) == ("c" in opts or "C" in opts))
    elif len(sets) > 1:
        second = _tr_set(sets[1]) or [""]
        second += second[-1:] * (len(first) - len(second))
        text = text.translate({ord(a): b for a, b in zip(first, second)})
    if "s" in opts:
        squeeze = set(_tr_set(sets[-1]))
        text = re.sub("|".join(f"{re.escape(c)}{{2,}}" for c in squeeze) or "(?!)", lambda m: m.group()[0], text)
    ctx.out.write(text)
    return 0


def _p_cut(ctx, argv):
    opts, names = _getopt(argv[1:], "sz", valued="dfcb", longs={"delimiter": "d", "fields": "f"})
    spec = opts.get("f") or opts.get("c") or opts.get("b")
    if not spec:
        raise _Usage("you must specify a list of bytes, characters, or fields")
    ranges = []
    for part in str(spec).split(","):
        m = re.fullmatch(r"(\d*)(-?)(\d*)", part)
        if not m or not (m.group(1) or m.group(3)):
            raise _Usage(f"invalid field value '{part}'")
        lo = int(m.group(1) or 1)
        ranges.append((lo, int(m.group(3)) if m.group(3) else (10 ** 9 if m.group(2) else lo)))
    pick = lambda k: any(lo <= k <= hi for lo, hi in ranges)  # noqa: E731
    items, status = _inputs(ctx, "cut", names)
    delim = str(opts.get("d", "\t"))[:1] or "\t"
    for _, text in items:
        for line in _lines(text):
            if "f" in opts:
                fields = line.split(delim)
                if len(fields) == 1:
                    if "s" not in opts:
                        ctx.out.write(line + "\n")
                    continue
                ctx.out.write(delim.join(f for k, f in enumerate(fields, 1) if pick(k)) + "\n")
            else:
                ctx.out.write("".join(c for k, c in enumerate(line, 1) if pick(k)) + "\n")
    return status


def _p_tee(ctx, argv):
    opts, names = _getopt(argv[1:], "ai", longs={"append": "a"})
    text, status, sinks = _slurp(ctx.stdin), 0, []
    for name in names:
        try:
            sinks.append(ctx.sim.open_write(name, ctx.cwd, "a" in opts, ctx.io))
        except _FsErr as e:
            ctx.fail("tee", f"{name}: {e}")
            status = 1
    for sink in sinks:
        sink.write(text)
    ctx.out.write(text)
    return status


def _p_yes(ctx, argv):
    line = (" ".join(argv[1:]) or "y") + "\n"
    chunk = line * max(1, CHARS_PER_STEP // len(line))
    while True:
        ctx.sim.tick()
        ctx.out.write(chunk)


def _p_find(ctx, argv):
    args, paths = list(argv[1:]), []
    while args and not args[0].startswith("-") and args[0] not in ("(", "!", ")"):
        paths.append(args.pop(0))
    groups, negate, actions, maxdepth, mindepth, i = [[]], False, [], 100, 0, 0
    fs = ctx.sim.fs
    while i < len(args):
        arg = args[i]

        def value():
            if i + 1 >= len(args):
                raise _Usage(f"missing argument to `{arg}'")
            return args[i + 1]

        pred = None
        if arg in ("-o", "-or"):
            groups.append([])
        elif arg in ("!", "-not"):
            negate = not negate
            i += 1
            continue
        elif arg in ("-a", "-and", "(", ")", "-print", "-depth", "-xdev", "-follow"):
            if arg == "-print":
                actions.append(("print",))
        elif arg in ("-name", "-iname", "-path", "-wholename", "-type", "-user", "-perm", "-size", "-newer",
                     "-mtime", "-mmin", "-group"):
            val = value()
            i += 1
            if arg == "-name":
                pred = lambda d, n, v=val: _glob_match(v, basename(d))  # noqa: E731
            elif arg == "-iname":
                pred = lambda d, n, v=val: _glob_match(v.lower(), basename(d).lower())  # noqa: E731
            elif arg in ("-path", "-wholename"):
                pred = lambda d, n, v=val: _glob_match(v, d)  # noqa: E731
            elif arg == "-type":
                kinds = {"f": ("file", "bin"), "d": ("dir",), "l": ("link",), "c": ("dev",)}.get(val, ())
                pred = lambda d, n, k=kinds: n.kind in k  # noqa: E731
            elif arg == "-user":
                pred = lambda d, n, v=val: n.owner == v or (v == "1000" and n.owner == USER)  # noqa: E731
        elif arg in ("-maxdepth", "-mindepth"):
            val = value()
            i += 1
            if not val.isdigit():
                raise _Usage(f"Expected a positive decimal integer argument to {arg}, but got `{val}'")
            maxdepth, mindepth = (int(val), mindepth) if arg == "-maxdepth" else (maxdepth, int(val))
        elif arg in ("-executable", "-readable", "-writable", "-empty"):
            pred = {"-executable": lambda d, n: fs.can(n, 1), "-readable": lambda d, n: fs.can(n, 4),
                    "-writable": lambda d, n: fs.can(n, 2),
                    "-empty": lambda d, n: (not n.children) if n.kind == "dir" else n.size == 0}[arg]
        elif arg == "-delete":
            actions.append(("delete",))
        elif arg in ("-exec", "-execdir", "-ok"):
            j = i + 1
            while j < len(args) and args[j] not in (";", "+"):
                j += 1
            if j >= len(args) or j == i + 1:
                raise _Usage(f"missing argument to `{arg}'")
            actions.append(("exec", args[i + 1:j], args[j] == "+"))
            i = j
        else:
            raise _Usage(f"unknown predicate `{arg}'")
        if pred is not None:
            groups[-1].append((negate, pred))
        negate = False
        i += 1
    found, status = [], 0
    for start in paths or ["."]:
        try:
            node = fs.walk(ctx.abspath(start))
        except _FsErr as e:
            ctx.fail("find", f"'{start}': {e}")
            status = 1
            continue
        for disp, sub, depth in _walk_tree(ctx, "find", start, node, maxdepth=maxdepth):
            if depth >= mindepth and any(all(pred(disp, sub) != neg for neg, pred in group) for group in groups):
                found.append((disp, sub))
    for disp, sub in found if not actions else []:
        ctx.out.write(disp + "\n")
    batch = []
    for action in actions:
        if action[0] == "print":
            ctx.out.write("".join(d + "\n" for d, _ in found))
        elif action[0] == "delete":
            for disp, sub in reversed(found):
                status |= _remove(ctx, disp, ctx.abspath(disp), sub) if sub.kind != "dir" or not sub.children else 0
        else:
            _, cmd, plus = action
            for disp, _ in found:
                if plus:
                    batch.append(disp)
                else:
                    status |= ctx.sim.spawn(ctx, [a.replace("{}", disp) for a in cmd], "find") != 0
            if plus and batch:
                status |= ctx.sim.spawn(ctx, [a for a in cmd if a != "{}"] + batch, "find") != 0
    return int(bool(status))


def _p_xargs(ctx, argv):
    args, per, repl, norun = list(argv[1:]), None, None, False
    while args and args[0].startswith("-") and args[0] != "--":
        arg = args.pop(0)
        if arg in ("-n", "-L", "-I", "-d", "-P", "-s") and args:
            val = args.pop(0)
            per, repl = (int(val) if val.isdigit() else None, repl) if arg in ("-n", "-L") else (
                per, val if arg == "-I" else repl)
        elif arg.startswith("-I") and len(arg) > 2:
            repl = arg[2:]
        elif arg.startswith("-n") and arg[2:].isdigit():
            per = int(arg[2:])
        elif arg in ("-r", "--no-run-if-empty"):
            norun = True
    if args and args[0] == "--":
        args.pop(0)
    cmd, text = args or ["echo"], _slurp(ctx.stdin)
    status = 0
    if repl is not None:
        for line in text.splitlines():
            if line.strip():
                status |= ctx.sim.spawn(ctx, [a.replace(repl, line.strip()) for a in cmd], "xargs") != 0
        return 123 if status else 0
    words = [w.strip("'\"") for w in re.findall(r"'[^']*'|\"[^\"]*\"|\S+", text)]
    if not words and not norun:
        return ctx.sim.spawn(ctx, cmd, "xargs")
    for k in range(0, len(words), per or max(len(words), 1)):
        status |= ctx.sim.spawn(ctx, cmd + words[k:k + (per or len(words))], "xargs") != 0
    return 123 if status else 0


def _p_hashsum(ctx, argv):
    algo = "md5" if "md5" in argv[0] else "sha1" if "sha1" in argv[0] else "sha256"
    opts, names = _getopt(argv[1:], "bctz")
    status = 0
    for name in names or ["-"]:
        try:
            text = _slurp(ctx.open(name))
        except _FsErr as e:
            ctx.fail(basename(argv[0]), f"{name}: {e}")
            status = 1
            continue
        ctx.out.write(f"{hashlib.new(algo, text.encode('utf-8', 'replace')).hexdigest()}  {name}\n")
    return status


def _p_readlink(ctx, argv):
    opts, names = _getopt(argv[1:], "fenmqsvz")
    canonical = basename(argv[0]) == "realpath" or opts.keys() & {"f", "e", "m"}
    status = 0
    for name in names:
        try:
            if canonical:
                ctx.out.write(ctx.sim.fs.realpath(ctx.abspath(name)) + "\n")
            else:
                node = ctx.sim.fs.walk(ctx.abspath(name), follow=False)
                if node.kind != "link":
                    raise _FsErr("Invalid argument")
                ctx.out.write(node.target + "\n")
        except _FsErr as e:
            if canonical and basename(argv[0]) == "realpath":
                ctx.fail("realpath", f"{name}: {e}")
            status = 1
    return status


def _p_strings(ctx, argv):
    opts, names = _getopt(argv[1:], "a", valued="n")
    size = int(opts["n"]) if str(opts.get("n", "")).isdigit() else 4
    items, status = _inputs(ctx, "strings", names)
    for _, text in items:
        ctx.out.write("".join(m.group() + "\n" for m in re.finditer(r"[ -~\t]{%d,}" % max(size, 1), text)))
    return status


def _p_wrapper(ctx, argv):
    """timeout, nohup, nice: run the rest of the command line (timeout's duration is not enforced)."""
    args = list(argv[1:])
    while args and args[0].startswith("-"):
        arg = args.pop(0)
        if arg in ("-s", "-k", "-n", "--signal", "--kill-after") and args:
            args.pop(0)
    if basename(argv[0]) == "timeout" and args:
        args.pop(0)
    if not args:
        raise _Usage("missing operand")
    return ctx.sim.spawn(ctx, args, basename(argv[0]))


def _p_truncate(ctx, argv):
    opts, names = _getopt(argv[1:], "co", valued="sr", longs={"size": "s", "no-create": "c"})
    m = re.fullmatch(r"([-+<>/%]?)(\d+)([KMG]?)", str(opts.get("s", "")))
    if not m or not names:
        raise _Usage("you must specify either '--size' or '--reference'" if names else "missing file operand")
    size, fs, status = int(m.group(2)) * {"": 1, "K": 1024, "M": 1 << 20, "G": 1 << 30}[m.group(3)], ctx.sim.fs, 0
    for name in names:
        try:
            sink = ctx.sim.open_write(name, ctx.cwd, True, ctx.io)
            if isinstance(sink, _FileSink):
                old = sink.node.content
                new = {"+": len(old) + size, "-": max(len(old) - size, 0)}.get(m.group(1), size)
                fs.set_content(sink.node, old[:new] + "\0" * max(new - len(old), 0))
        except (_FsErr, _WriteFailed) as e:
            ctx.fail("truncate", f"cannot open '{name}' for writing: {e}")
            status = 1
    return status


def _p_unlink(ctx, argv):
    if len(argv) != 2:
        raise _Usage("missing operand" if len(argv) < 2 else f"extra operand '{argv[2]}'")
    path = ctx.abspath(argv[1])
    try:
        node = ctx.sim.fs.walk(path, follow=False)
        if node.kind == "dir":
            raise _FsErr("Is a directory")
    except _FsErr as e:
        ctx.fail("unlink", f"cannot unlink '{argv[1]}': {e}")
        return 1
    return _remove(ctx, argv[1], path, node)


def _p_clear(ctx, argv):
    ctx.err.write("TERM environment variable not set.\n")
    return 1


_BUILTINS = {
    ":": _b_true, "true": _b_true, "false": _b_false, "echo": _p_echo, "printf": _p_printf, "pwd": _p_pwd,
    "cd": _b_cd, "export": _b_export, "declare": _b_declare, "typeset": _b_declare, "local": _b_declare,
    "readonly": _b_declare, "unset": _b_unset, "alias": _b_alias, "unalias": _b_unalias, "source": _b_source,
    ".": _b_source, "exit": _b_exit, "logout": _b_logout, "return": _b_return, "break": _b_break,
    "continue": _b_break, "shift": _b_shift, "eval": _b_eval, "exec": _b_exec, "set": _b_set, "type": _b_type,
    "command": _b_command, "builtin": _b_builtin, "enable": _b_enable, "read": _b_read, "let": _b_let,
    "test": _p_test, "[": _p_test, "kill": _p_kill, "trap": _b_trap, "umask": _b_umask, "shopt": _b_true,
    "hash": _b_true, "wait": _b_true, "jobs": _b_true, "disown": _b_true, "history": _b_true, "times": _b_noop,
    "ulimit": _b_noop, "bg": _b_noop, "fg": _b_noop,
}
_SPECIAL_BUILTINS = {":", ".", "source", "eval", "exec", "exit", "export", "readonly", "return", "set", "shift",
                     "trap", "unset", "break", "continue"}
_PROGRAMS = {
    "bash": _p_bash, "sh": _p_bash, "dash": _p_bash, "ls": _p_ls, "cat": _p_cat, "more": _p_cat, "less": _p_cat,
    "echo": _p_echo, "printf": _p_printf, "pwd": _p_pwd, "kill": _p_kill, "test": _p_test, "[": _p_test,
    "true": _b_true, "false": _b_false, "head": _head_tail, "tail": _head_tail, "grep": _p_grep, "egrep": _p_grep,
    "wc": _p_wc, "file": _p_file, "stat": _p_stat, "which": _p_which, "whoami": _p_id, "id": _p_id,
    "groups": _p_id, "uname": _p_uname, "hostname": _p_hostname, "env": _p_env, "printenv": _p_printenv,
    "ps": _p_ps, "sleep": _p_sleep, "date": _p_date, "sed": None, "mkdir": _p_mkdir, "rmdir": _p_rmdir,
    "touch": _p_touch, "rm": _p_rm, "mv": _p_mv, "cp": _p_cp, "ln": _p_ln, "chmod": _p_chmod, "chown": _p_chown,
    "chgrp": _p_chown, "basename": _p_basename, "dirname": _p_basename, "seq": _p_seq, "sort": _p_sort,
    "uniq": _p_uniq, "tr": _p_tr, "cut": _p_cut, "tee": _p_tee, "yes": _p_yes, "find": _p_find,
    "xargs": _p_xargs, "md5sum": _p_hashsum, "sha1sum": _p_hashsum, "sha256sum": _p_hashsum,
    "readlink": _p_readlink, "realpath": _p_readlink, "strings": _p_strings, "timeout": _p_wrapper,
    "nohup": _p_wrapper, "nice": _p_wrapper, "clear": _p_clear,
    "truncate": _p_truncate, "unlink": _p_unlink,
}


class _SedError(Exception):
    pass


def _sed_delimited(s, i, delim):
    """Text up to the unescaped delimiter: (text, index after it); an escaped delimiter becomes literal."""
    out = []
    while i < len(s):
        c = s[i]
        if c == "\\" and i + 1 < len(s):
            out.append(s[i + 1] if s[i + 1] == delim else s[i:i + 2])
            i += 2
        elif c == delim:
            return "".join(out), i + 1
        else:
            out.append(c)
            i += 1
    raise _SedError("unterminated `s' command")


def _sed_regex(pat, ere, flags=0):
    if not pat:
        raise _SedError("no previous regular expression")
    try:
        return _compile(_posix_re(pat, ere), flags)
    except _Usage as e:
        raise _SedError(str(e))


def _sed_compile(script, ere):
    """sed commands: [addr[,addr]][!] then s y a i c d p P q Q = n N, separated by ; or newlines."""
    cmds, i, n = [], 0, len(script)

    def address():
        nonlocal i
        m = re.match(r"\d+", script[i:])
        if m:
            i += m.end()
            return ("line", int(m.group()))
        if script[i:i + 1] == "$":
            i += 1
            return ("last",)
        if script[i:i + 1] in ("/", "\\"):
            delim = "/"
            if script[i] == "\\":
                i += 1
                delim = script[i:i + 1] or "/"
            pat, i = _sed_delimited(script, i + 1, delim)
            flags = 0
            while script[i:i + 1] in ("I", "M"):
                flags |= re.I if script[i] == "I" else re.M
                i += 1
            return ("re", _sed_regex(pat, ere, flags))
        return None

    while i < n:
        while i < n and script[i] in " \t\n;":
            i += 1
        if i >= n:
            break
        if script[i] == "#":
            i = script.find("\n", i) if "\n" in script[i:] else n
            continue
        first = address()
        second = None
        if first is not None and script[i:i + 1] == ",":
            i += 1
            second = address()
            if second is None:
                raise _SedError("unexpected `,'")
        while script[i:i + 1] in (" ", "\t"):
            i += 1
        neg = script[i:i + 1] == "!"
        i += neg
        while script[i:i + 1] in (" ", "\t"):
            i += 1
        if i >= n:
            raise _SedError("missing command")
        c = script[i]
        i += 1
        cmd = {"a1": first, "a2": second, "neg": neg, "c": c, "on": False}
        if c in "sy":
            if i >= n:
                raise _SedError(f"unterminated `{c}' command")
            delim = script[i]
            left, i = _sed_delimited(script, i + 1, delim)
            right, i = _sed_delimited(script, i, delim)
            if c == "y":
                left, right = (_escapes(t)[0] for t in (left, right))
                if len(left) != len(right):
                    raise _SedError("strings for `y' command are different lengths")
                cmd["table"] = str.maketrans(left, right)
            else:
                flags = re.match(r"[gpiIme0-9]*", script[i:]).group()
                i += len(flags)
                rx = _sed_regex(left, ere, re.I if "i" in flags or "I" in flags else 0)
                parts, k = [], 0
                while k < len(right):
                    ch = right[k]
                    if ch == "\\" and k + 1 < len(right):
                        d = right[k + 1]
                        parts.append(int(d) if d.isdigit() else {"n": "\n", "t": "\t"}.get(d, d))
                        k += 2
                        continue
                    parts.append(0 if ch == "&" else ch)
                    k += 1
                refs = [p for p in parts if isinstance(p, int)]
                if refs and max(refs) > rx.groups:
                    raise _SedError(f"invalid reference \\{max(refs)} on `s' command's RHS")
                cmd.update(rx=rx, rep=parts, g="g" in flags, p="p" in flags,
                           nth=int(re.sub(r"\D", "", flags) or 1))
        elif c in "aic":
            if script[i:i + 1] == "\\":
                i += 1
                if script[i:i + 1] == "\n":
                    i += 1
            while script[i:i + 1] in (" ", "\t"):
                i += 1
            end = script.find("\n", i)
            end = n if end < 0 else end
            cmd["text"] = re.sub(r"\\(.)", r"\1", script[i:end])
            i = end
        elif c in "qQ":
            i += len(re.match(r"\d*", script[i:]).group())
        elif c not in "dpP=nN":
            raise _SedError(f"unknown command: `{c}'")
        cmds.append(cmd)
        while script[i:i + 1] in (" ", "\t"):
            i += 1
        if i < n and script[i] not in ";\n#":
            raise _SedError("extra characters after command")
    return cmds


def _sed_run(cmds, text, quiet, sim):
    lines, out, idx = _lines(text), [], 0
    total = len(lines)
    for cmd in cmds:
        cmd["on"] = False

    def hit(addr, ln, space):
        return ((addr[0] == "line" and ln == addr[1]) or (addr[0] == "last" and ln == total)
                or (addr[0] == "re" and addr[1].search(space) is not None))

    def selected(cmd, ln, space):
        a1, a2 = cmd["a1"], cmd["a2"]
        if a1 is None:
            result = True
        elif a2 is None:
            result = hit(a1, ln, space)
        elif cmd["on"]:
            result = True
            if (a2[0] == "line" and ln >= a2[1]) or (a2[0] != "line" and hit(a2, ln, space)):
                cmd["on"] = False
        elif hit(a1, ln, space):
            result = True
            cmd["on"] = not (a2[0] == "line" and a2[1] <= ln)
        else:
            result = False
        return result != cmd["neg"]

    while idx < total:
        sim.charge(len(lines[idx]) + 256)
        space, ln = lines[idx], idx + 1
        deleted = stop = False
        after = []
        for cmd in cmds:
            if not selected(cmd, ln, space):
                continue
            c = cmd["c"]
            if c == "s":
                count = 0

                def replace(m, cmd=cmd):
                    nonlocal count
                    count += 1
                    if count < cmd["nth"] or (count > cmd["nth"] and not cmd["g"]):
                        return m.group()
                    return "".join(p if isinstance(p, str) else (m.group(p) or "") for p in cmd["rep"])

                new = cmd["rx"].sub(replace, space)
                if count >= cmd["nth"]:
                    space = new
                    if cmd["p"]:
                        out.append(space)
            elif c == "d":
                deleted = True
                break
            elif c in "pP":
                out.append(space if c == "p" else space.split("\n")[0])
            elif c == "=":
                out.append(str(ln))
            elif c == "i":
                out.append(cmd["text"])
            elif c == "a":
                after.append(cmd["text"])
            elif c == "c":
                if cmd["a2"] is None or not cmd["on"]:
                    out.append(cmd["text"])
                deleted = True
                break
            elif c == "y":
                space = space.translate(cmd["table"])
            elif c in "qQ":
                stop, deleted = True, c == "Q"
                break
            elif c in "nN":
                if idx + 1 >= total:
                    stop = True
                    break
                if c == "n" and not quiet:
                    out.append(space)
                idx += 1
                ln = idx + 1
                space = lines[idx] if c == "n" else space + "\n" + lines[idx]
        if not deleted and not quiet:
            out.append(space)
        out.extend(after)
        idx += 1
        if stop:
            break
    result = "".join(line + "\n" for line in out)
    return result[:-1] if result and text and not text.endswith("\n") and idx >= total else result


def _p_sed(ctx, argv):
    args, scripts, files, inplace, quiet, ere = list(argv[1:]), [], [], None, False, False
    while args:
        arg = args.pop(0)
        if arg in ("-e", "--expression"):
            if not args:
                raise _Usage("option requires an argument -- 'e'")
            scripts.append(args.pop(0))
        elif arg.startswith("--expression="):
            scripts.append(arg.split("=", 1)[1])
        elif arg in ("-n", "--quiet", "--silent"):
            quiet = True
        elif arg in ("-E", "-r", "--regexp-extended"):
            ere = True
        elif arg.startswith("--in-place"):
            inplace = arg.partition("=")[2]
        elif arg == "--":
            files.extend(args)
            break
        elif arg.startswith("--"):
            raise _Usage(f"unknown option -- '{arg[2:]}'")
        elif arg.startswith("-") and len(arg) > 1:
            for j, ch in enumerate(arg[1:], 1):
                if ch == "i":
                    inplace = arg[j + 1:]
                    break
                if ch == "e":
                    if arg[j + 1:] or args:
                        scripts.append(arg[j + 1:] or args.pop(0))
                        break
                    raise _Usage("option requires an argument -- 'e'")
                if ch == "n":
                    quiet = True
                elif ch in "Er":
                    ere = True
                elif ch not in "suz":
                    raise _Usage(f"invalid option -- '{ch}'")
        else:
            files.append(arg)
    if not scripts:
        if not files:
            ctx.err.write("Usage: sed [OPTION]... {script-only-if-no-other-script} [input-file]...\n")
            return 1
        scripts.append(files.pop(0))
    try:
        cmds = _sed_compile("\n".join(scripts), ere)
    except _SedError as e:
        ctx.fail("sed", f"-e expression #1, char {len(scripts[0])}: {e}")
        return 1
    if inplace is None:
        items, status = [], 0
        for name in files or ["-"]:
            try:
                items.append(_slurp(ctx.open(name)))
            except _FsErr as e:
                ctx.fail("sed", f"can't read {name}: {e}")
                status = 2
        ctx.out.write(_sed_run(cmds, "".join(items), quiet, ctx.sim))
        return status
    if not files:
        ctx.fail("sed", "no input files")
        return 1
    fs, status = ctx.sim.fs, 0
    for name in files:
        path = ctx.abspath(name)
        try:
            node = fs.walk(path)
            if node.kind == "dir":
                ctx.fail("sed", f"couldn't edit {name}: not a regular file")
                status = 4
                continue
            if not fs.can(node, 4):
                raise _FsErr("Permission denied")
            text = _slurp(ctx.sim.node_stream(node))
        except _FsErr as e:
            ctx.fail("sed", f"can't read {name}: {e}")
            status = 2
            continue
        dirnode, base = fs.parent(path)
        if not fs.can(dirnode, 3):
            ctx.fail("sed", f"couldn't open temporary file {path.rsplit('/', 1)[0] or '/'}/sedQ2k9Xw: Permission "
                            f"denied")
            status = 4
            continue
        result = _sed_run(cmds, text, quiet, ctx.sim)
        try:
            if inplace:
                backup = inplace.replace("*", base) if "*" in inplace else base + inplace
                copy_node = fs.new("file", node.mode, USER)
                fs.set_content(copy_node, text)
                if backup in dirnode.children:
                    fs.unlink(dirnode, backup)
                fs.add(dirnode, backup, copy_node)
            fs.set_content(node, result)
            node.owner = USER
        except (_WriteFailed, _FsErr) as e:
            ctx.fail("sed", f"couldn't write {name}: {e}")
            status = 4
    return status


_PROGRAMS["sed"] = _p_sed


def _realpath(fs, path, hops=0):
    """Canonical path with every symlink resolved (readlink -f)."""
    node, done, parts = fs.root, [], [p for p in path.split("/") if p]
    for i, part in enumerate(parts):
        if node.kind != "dir":
            raise _FsErr("Not a directory")
        child = node.children.get(part)
        if child is None:
            raise _FsErr("No such file or directory")
        if child.kind == "link":
            if hops > 8:
                raise _FsErr("Too many levels of symbolic links")
            rest = "/".join(parts[i + 1:])
            return _realpath(fs, _FS.norm(child.target + ("/" + rest if rest else ""), "/" + "/".join(done)),
                             hops + 1)
        done.append(part)
        node = child
    return "/" + "/".join(done)


_FS.realpath = _realpath


# ---------------------------------------------------------------- the machine

_ETC_FILES = [
    ("passwd", 0o644, "root:x:0:0:root:/root:/bin/bash\ndaemon:x:1:1:daemon:/usr/sbin:/usr/sbin/nologin\n"
                      "bin:x:2:2:bin:/bin:/usr/sbin/nologin\nsys:x:3:3:sys:/dev:/usr/sbin/nologin\n"
                      "nobody:x:65534:65534:nobody:/nonexistent:/usr/sbin/nologin\n"
                      "user:x:1000:1000::/home/user:/bin/bash\n"),
    ("group", 0o644, "root:x:0:\ndaemon:x:1:\nbin:x:2:\nsys:x:3:\nnogroup:x:65534:\nuser:x:1000:\n"),
    ("shadow", 0o640, "root:*:19700:0:99999:7:::\nuser:!:19700:0:99999:7:::\n"),
    ("hostname", 0o644, "sandbox\n"),
    ("hosts", 0o644, "127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n"),
    ("os-release", 0o644, 'PRETTY_NAME="Debian GNU/Linux 12 (bookworm)"\nNAME="Debian GNU/Linux"\n'
                          'VERSION_ID="12"\nID=debian\n'),
    ("profile", 0o644, "# /etc/profile: system-wide .profile file for the Bourne shell (sh(1))\n"),
]
_PROFILE = ('# ~/.profile: executed by the command interpreter for login shells.\n'
            'if [ -n "$BASH_VERSION" ]; then\n    if [ -f "$HOME/.bashrc" ]; then\n        . "$HOME/.bashrc"\n'
            '    fi\nfi\n')
_BASHRC = "# ~/.bashrc: executed by bash(1) for non-login shells.\nalias ll='ls -alF'\n"


class BashSim:
    """The simulated machine: file system, clock, pids, umask, and the budget and terminal of one call.

    run(command) is `bash --login -c COMMAND` in /home/user: /etc/profile, then the first of ~/.bash_profile,
    ~/.bash_login, ~/.profile (whose default sources ~/.bashrc). Aliases are stored, never expanded (bash does
    not expand them in non-interactive shells). A call that exhausts its budget or time returns its output so
    far and TIMEOUT_TEXT; output beyond max_output_chars is cut with a marker. Shell state does not outlive a
    call; the file system, clock, pids and umask do.

    Options: max_output_chars, command_budget (steps per call: a command, a loop iteration, a fork, 4 KiB of
    data), time_limit (simulated seconds per call; only sleep spends them), seed (for $RANDOM and
    /dev/urandom), kill_builtin (True: kill is a shell builtin as in bash and dash, so an executable named kill
    earlier in PATH does not shadow it; False: it does).

    For the caller: file_text(path); add_file() and install_program() to build the machine; execve() for a
    program that runs a file; stop_command() or raising StopCommand to end the rest of the command line.
    Hooks (None or a callable): on_exec(path) when a file is executed or sourced (absolute path);
    on_command(argv, program_of) before each simple command runs, with its expanded words, where
    program_of(name) is the installed program that name runs there (None for a function, builtin or script).
    halted: PID 1 got a terminating signal; that call ends there, and halted stays True.
    """

    def __init__(self, max_output_chars=4000, command_budget=10000, time_limit=15.0, seed=0, kill_builtin=True):
        self.max_output_chars, self.command_budget, self.time_limit = max_output_chars, command_budget, time_limit
        self.kill_builtin = kill_builtin
        self.rng = random.Random(seed)
        self._noise = "".join(chr(self.rng.randrange(256)) for _ in range(CHARS_PER_STEP))
        self.umask, self.last_pid, self.login_pid, self.clock = 0o022, 40, 0, 0.0
        self.halted = False
        self.on_exec = self.on_command = None
        self.programs = {}                # name -> function; a "bin" node runs the one its prog names
        self.term = _Term(self)
        self._begin_call()
        self.fs = _FS(self)
        self._build_fs()

    # ------------------------------------------------ for the caller

    def run(self, command):
        """One `bash --login -c COMMAND` started in /home/user; returns what the terminal shows. Never raises."""
        command = command if isinstance(command, str) else str(command)
        self._begin_call()
        self.clock += 1
        timed_out = False
        try:
            shell = _Shell(self, "bash", name="bash", cwd=HOME, environ=self._login_environ())
            self.login_pid = shell.pid
            try:
                shell.source_profiles()
                shell.run_text(command)
            except (_Exit, _Break):
                pass
            except _ShellError as e:
                shell.err(e.msg)
        except (_MachineDown, StopCommand):
            pass
        except _Timeout:
            timed_out = True
        except _WriteFailed:
            pass
        except Exception as e:  # never let a command crash the caller
            self.emit(f"bash: internal error ({type(e).__name__})\n")
        text = self._output()
        if timed_out:
            text += ("\n" if text and not text.endswith("\n") else "") + TIMEOUT_TEXT
        return text

    def file_text(self, path):
        """Contents of a file (a path relative to /home/user or absolute), or None if it is missing or not a
        regular file."""
        try:
            node = self.fs.walk(_FS.norm(path, HOME))
        except _FsErr:
            return None
        return node.content if node.kind == "file" else None

    def snapshot(self):
        """The file tree as a value to compare (each path's kind, mode, owner, contents, link target and
        program; not times): equal snapshots before and after a command mean it changed no file."""
        entries = []

        def visit(path, node):
            entries.append((path, node.kind, node.mode, node.owner, node.content, node.target, node.prog))
            for name, child in sorted((node.children or {}).items()):
                visit(f"{path.rstrip('/')}/{name}", child)
        visit("/", self.fs.root)
        return tuple(entries)

    def add_file(self, path, text, mode=0o644, owner=USER):
        """A regular file at an absolute path whose directory exists (owner: USER or "root")."""
        self._make(path, "file", mode, owner, content=text)
        self.fs.used += len(text)

    def install_program(self, path, name, func, mode=0o755, owner="root", size=None):
        """A compiled program at an absolute path: running it calls func(ctx, argv) -> exit status. size is the
        apparent file size that ls and stat show."""
        self.programs[name] = func
        self._make(path, "bin", mode, owner, prog=name, bin_size=_binary_size(name) if size is None else size)

    def execve(self, ctx, path):
        """execve() of the file at path from a running program, with a copy of its files, cwd and environment:
        no shell in between, so exec errors are not printed and a file without #! fails (Exec format error).
        Returns the exit status."""
        sub = Ctx(self, dict(ctx.io), ctx.cwd, dict(ctx.environ))
        try:
            return self.exec_file(path, [path], sub, "", quiet=True, fallback=None)
        except _Exit as e:
            return e.status

    def stop_command(self):
        """Stop the rest of the command line once the running program returns (before the next command)."""
        self._stopping = True

    # ------------------------------------------------ one call

    def _begin_call(self):
        self._steps = self._chars = self._depth = self.background = 0
        self._out, self._out_len, self.elapsed, self._stopping = [], 0, 0.0, False

    def _output(self):
        text = "".join(self._out)
        if self._out_len > self.max_output_chars:
            text += f"\n[output truncated: {self._out_len - self.max_output_chars} more characters]"
        return text

    def _login_environ(self):
        return {"HOME": HOME, "USER": USER, "LOGNAME": USER, "SHELL": "/bin/bash", "PATH": DEFAULT_PATH,
                "PWD": HOME, "HOSTNAME": "sandbox", "LANG": "C.UTF-8", "SHLVL": "0"}

    def _make(self, path, kind="dir", mode=0o755, owner="root", **fields):
        dirnode, name = self.fs.parent(path)
        self.fs.add(dirnode, name, self.fs.new(kind, mode, owner, **fields))

    def _build_fs(self):
        make = self._make
        for name in ("boot", "dev", "etc", "home", "media", "mnt", "opt", "proc", "run", "srv", "sys", "usr",
                     "var", "usr/bin", "usr/sbin", "usr/lib", "usr/local", "usr/local/bin", "usr/local/sbin",
                     "usr/share", "var/log", "var/lib"):
            make("/" + name)
        make("/root", mode=0o700)
        make("/tmp", mode=0o1777)
        make("/var/tmp", mode=0o1777)
        for name in ("bin", "sbin", "lib"):
            make("/" + name, "link", 0o777, target="usr/" + name)
        for name, mode, text in _ETC_FILES:
            self.add_file("/etc/" + name, text, mode, "root")
        for name in ("null", "zero", "random", "urandom"):
            make("/dev/" + name, "dev", 0o666, prog=name)
        for name, func in _PROGRAMS.items():
            self.install_program("/usr/bin/" + name, name, func)
        make(HOME, owner=USER)
        for name, text in ((".profile", _PROFILE), (".bashrc", _BASHRC)):
            self.add_file(HOME + "/" + name, text, 0o644, USER)

    # ------------------------------------------------ services for the shell and the programs

    def now(self):
        return self.clock

    def new_pid(self):
        self.last_pid += 1
        return self.last_pid

    def tick(self, steps=1):
        self._steps += steps
        if self._steps > self.command_budget:
            raise _Timeout()

    def charge(self, chars):
        self._chars += chars
        if self._chars >= CHARS_PER_STEP:
            self.tick(self._chars // CHARS_PER_STEP)
            self._chars %= CHARS_PER_STEP

    def sleep(self, seconds):
        if self.background:
            return
        self.elapsed += seconds
        if self.elapsed > self.time_limit:
            self.clock += self.time_limit
            raise _Timeout()
        self.clock += seconds

    @contextlib.contextmanager
    def nest(self):
        if self._depth >= MAX_DEPTH:
            raise _ShellError("fork: retry: Resource temporarily unavailable", 254)
        self._depth += 1
        try:
            yield
        finally:
            self._depth -= 1

    def emit(self, text):
        self.charge(len(text))
        room = self.max_output_chars - self._out_len
        if room > 0:
            self._out.append(text[:room])
        self._out_len += len(text)

    def check_stop(self):
        if self._stopping:
            raise StopCommand()

    def machine_down(self):
        self.halted = True
        raise _MachineDown()

    def note_exec(self, path):
        if self.on_exec is not None:
            self.on_exec(path)

    def open_read(self, path):
        node = self.fs.walk(path)
        if node.kind == "dir":
            raise _FsErr("Is a directory")
        if not self.fs.can(node, 4):
            raise _FsErr("Permission denied")
        return self.node_stream(node)

    def node_stream(self, node):
        if node.kind == "dev":
            if node.prog == "zero":
                return _Infinite(self, "\0" * CHARS_PER_STEP)
            return _Infinite(self, self._noise) if node.prog in ("random", "urandom") else _In("")
        text = _fake_binary(node.prog) if node.kind == "bin" else node.content
        self.charge(len(text))
        return _In(text)

    def open_write(self, target, cwd, append, io):
        path = _FS.norm(target, cwd)
        special = {"/dev/stdout": io.get(1), "/dev/stderr": io.get(2), "/dev/tty": self.term}
        if path in special:
            return special[path] or _Null(self)
        try:
            node = self.fs.walk(path)
        except _FsErr as e:
            if str(e) != "No such file or directory":
                raise
            dirnode, name = self.fs.parent(path)
            if not self.fs.can(dirnode, 3):
                raise _FsErr("Permission denied")
            node = self.fs.new("file", 0o666 & ~self.umask, USER)
            self.fs.add(dirnode, name, node)
            return _FileSink(self, node)
        if node.kind == "dir":
            raise _FsErr("Is a directory")
        if not self.fs.can(node, 2):
            raise _FsErr("Permission denied")
        if node.kind == "dev":
            return _Null(self)
        if not append:
            self.fs.set_content(node, "")
        return _FileSink(self, node)

    def path_lookup(self, name, path_var, cwd, every=False, bits=1):
        """Executables (or, with bits=4, readable files) called `name` in the PATH directories."""
        found, dirs = [], path_var.split(":")
        self.tick(len(dirs) // 50)
        if not name or "/" in name:
            return found
        for directory in dirs:
            path = _FS.norm(name, _FS.norm(directory or ".", cwd))
            try:
                node = self.fs.walk(path)
            except _FsErr:
                continue
            if node.kind not in ("dir", "dev") and self.fs.can(node, bits):
                found.append(path)
                if not every:
                    break
        return found

    def call(self, func, ctx, argv, label):
        """Run one command, turning its usage, file-system and write errors into messages and statuses."""
        try:
            return func(ctx, argv)
        except (_Usage, _FsErr, _WriteFailed) as e:
            if isinstance(e, _WriteFailed) and str(e) == "Broken pipe":
                return 141
            try:
                ctx.err.write(f"{label}: {'write error: ' if isinstance(e, _WriteFailed) else ''}{e}\n")
            except _WriteFailed:
                pass
            return 2 if isinstance(e, _Usage) else 1

    def run_program(self, prog, argv, ctx):
        self.tick()                       # a fork and exec
        self.new_pid()
        with self.nest():
            return self.call(self.programs[prog], ctx, argv, basename(argv[0]))

    def exec_file(self, path, argv, ctx, who, quiet=False, fallback="bash"):
        """execve() of the file at `path` (relative to ctx.cwd): a program, or a script run by its #! line.
        A file without #! is run by `fallback` (bash and execvp do that); fallback=None: Exec format error."""
        abs_path = _FS.norm(path, ctx.cwd)
        self.note_exec(abs_path)

        def fail(msg, status):
            if not quiet:
                ctx.err.write(f"{who}: {path}: {msg}\n")
            return status

        try:
            node = self.fs.walk(abs_path)
        except _FsErr as e:
            return fail(str(e), 127 if "No such" in str(e) else 126)
        if node.kind == "dir":
            return fail("Is a directory", 126)
        if node.kind == "dev" or not self.fs.can(node, 1):
            return fail("Permission denied", 126)
        if node.kind == "bin":
            return self.run_program(node.prog, argv, ctx)
        if node.content.startswith("#!"):
            line = node.content[2:].split("\n", 1)[0].replace("\t", " ").strip(" ")
            interp, _, arg = line.partition(" ")
            if interp:
                try:
                    inode = self.fs.walk(_FS.norm(interp, ctx.cwd))
                except _FsErr:
                    inode = None
                if inode is None or inode.kind != "bin" or not self.fs.can(inode, 1):
                    reason = "No such file or directory" if inode is None else "Permission denied"
                    return fail(f"{interp}: bad interpreter: {reason}", 126)
                arg = arg.strip(" ")
                return self.run_program(inode.prog, [interp] + ([arg] if arg else []) + [path] + argv[1:], ctx)
        if fallback is None:
            return fail("Exec format error", 126)
        return self.run_program(fallback, [fallback, path] + argv[1:], ctx)

    def spawn(self, ctx, argv, who):
        """execvp() from a program (env, find -exec, xargs): PATH search only, no functions or builtins."""
        path = argv[0]
        if "/" not in path:
            found = self.path_lookup(path, ctx.environ.get("PATH", ""), ctx.cwd)
            if not found:
                ctx.err.write(f"{who}: '{path}': No such file or directory\n")
                return 127
            path = found[0]
        return self.exec_file(path, argv, ctx, who, fallback="sh")
