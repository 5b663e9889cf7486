#!/usr/bin/env python3
"""The ABI of the shared libsiphon is what the public headers declare.

usage: check_symbols.py LIBSIPHON.so MAP PROJECT_VERSION HEADER...

Checks, from `readelf --dyn-syms` of the built library:
  - the newest version node of MAP (the linker version script) is
    SIPHON_<major>.<minor> of PROJECT_VERSION (or an older minor of the
    same major: a release that adds no function needs no node);
  - every defined dynamic symbol is a siphon_* function whose default
    version (name@@NODE) is a node of MAP; the only others allowed are the
    nodes' own absolute symbols, which GNU ld adds;
  - the exported set equals the set of functions the headers declare: each
    non-static prototype is exported, nothing else is (an internal function
    marked SIPHON_API, or a public one that lost it, both fail), and every
    siphon_* function that a header's static inline wrapper calls is
    exported (so virdomain_stream.h links against the library alone).

The headers are parsed here, not preprocessed: comments, string literals
and preprocessor lines are dropped, the `extern "C"` block of C++ builds is
ignored, and top-level statements are split on braces and semicolons. The
parser refuses what it does not understand (unbalanced braces, a top-level
statement it cannot classify), so a header change that confuses it fails
the test instead of silently shrinking the checked set.

Prints a line per check and ends with `N passed, N failed`. Exits 77 when
readelf is missing, 1 on any failure.
"""
import re
import shutil
import subprocess
import sys

passed = 0
failed = 0


def check(ok, what):
    global passed, failed
    if ok:
        passed += 1
        print("ok:", what)
    else:
        failed += 1
        print("FAIL:", what)


TOKEN = re.compile(
    r'//[^\n]*|/\*.*?\*/|"(?:\\.|[^"\\\n])*"|\'(?:\\.|[^\'\\\n])*\'',
    re.S)


def strip_source(text):
    """Header text without comments, literals and preprocessor lines."""
    def repl(m):
        t = m.group(0)
        if t.startswith('/'):
            # Keep line structure for the preprocessor pass below.
            return ' ' + '\n' * t.count('\n')
        return '""'
    text = TOKEN.sub(repl, text)
    text = text.replace('\\\n', ' ')
    out = []
    skip_cxx = 0
    for line in text.split('\n'):
        s = line.strip()
        if s.startswith('#'):
            d = s[1:].strip()
            # The extern "C" { ... } wrapper only exists for C++.
            if re.match(r'ifdef\s+__cplusplus\b', d):
                skip_cxx += 1
            elif skip_cxx and d.startswith('endif'):
                skip_cxx -= 1
            continue
        if not skip_cxx:
            out.append(line)
    return '\n'.join(out)


ATTR = re.compile(r'__attribute__\s*\(\(.*?\)\)', re.S)


def parse_header(path):
    """(declared functions, inline-defined functions, siphon_* they call)."""
    text = strip_source(open(path, encoding='utf-8').read())
    text = ATTR.sub(' ', text)
    declared, inline, called = set(), set(), set()
    depth = 0
    stmt = ''
    body = ''
    i = 0
    while i < len(text):
        c = text[i]
        i += 1
        if depth == 0:
            if c == '{':
                head = ' '.join(stmt.split())
                m = re.search(r'\b([A-Za-z_]\w*)\s*\([^()]*\)\s*$', head)
                if m and re.match(r'static\b', head) and \
                        'inline' in head.split():
                    # An inline definition: its body, then no ';'.
                    inline.add(m.group(1))
                    depth = 1
                    body = ''
                    stmt = None
                    continue
                if m:
                    raise ValueError('%s: function defined in a header '
                                     'without static inline: %s'
                                     % (path, head))
                depth = 1
                stmt += c
                continue
            if c == '}':
                raise ValueError('%s: unbalanced }' % path)
            if c == ';':
                classify(path, ' '.join(stmt.split()), declared)
                stmt = ''
                continue
            stmt += c
        else:
            if c == '{':
                depth += 1
            elif c == '}':
                depth -= 1
            if stmt is None:
                if depth == 0:
                    called |= set(re.findall(r'\b(siphon_\w+)\s*\(', body))
                    stmt = ''
                else:
                    body += c
            else:
                stmt += c
    if depth or (stmt and stmt.strip()):
        raise ValueError('%s: unterminated top-level statement' % path)
    return declared, inline, called


def classify(path, s, declared):
    """Record a top-level statement's function declaration, if it is one."""
    if not s:
        return
    if re.match(r'(typedef|_Static_assert|static_assert)\b', s):
        return
    if re.match(r'(struct|enum|union)\b', s):
        if '{' in s:
            if not s.endswith('}'):
                raise ValueError('%s: a variable defined with its type: %s'
                                 % (path, s))
            return  # a type definition
        if '(' not in s:
            return  # a forward declaration
    if re.match(r'static\b', s):
        raise ValueError('%s: static declaration in a header: %s'
                         % (path, s))
    m = re.search(r'\b([A-Za-z_]\w*)\s*\((.*)\)$', s)
    if m and '=' not in s:
        declared.add(m.group(1))
        return
    raise ValueError('%s: cannot classify top-level statement: %s'
                     % (path, s))


def dyn_symbols(readelf, lib):
    """{name: (version or None, default version?, type, section)}."""
    out = subprocess.run([readelf, '--dyn-syms', '--wide', lib],
                         check=True, capture_output=True,
                         text=True).stdout
    syms = {}
    for line in out.splitlines():
        f = line.split()
        if len(f) < 8 or not f[0].rstrip(':').isdigit():
            continue
        typ, ndx, name = f[3], f[6], f[7]
        if ndx == 'UND':
            continue
        ver, default = None, False
        if '@@' in name:
            name, ver = name.split('@@', 1)
            default = True
        elif '@' in name:
            name, ver = name.split('@', 1)
        syms[name] = (ver, default, typ, ndx)
    return syms


def main(argv):
    if len(argv) < 5:
        print(__doc__)
        return 2
    lib, map_path, version, headers = argv[1], argv[2], argv[3], argv[4:]
    readelf = shutil.which('readelf')
    if not readelf:
        print('readelf missing: skipped')
        return 77

    nodes = re.findall(r'^\s*([A-Za-z_][\w.]*)\s*\{',
                       strip_source(open(map_path).read()), re.M)
    # The newest node names the release that last added functions: the
    # project's major.minor, or older when a release added none.
    want = tuple(int(x) for x in version.split('.')[:2])
    m = re.match(r'SIPHON_(\d+)\.(\d+)$', nodes[-1]) if nodes else None
    newest = (int(m.group(1)), int(m.group(2))) if m else None
    check(newest is not None and newest[0] == want[0] and newest <= want,
          'version script %s: newest node %s is SIPHON_%d.%d or an older '
          'minor of it (project %s)'
          % (map_path, nodes[-1] if nodes else None, want[0], want[1],
             version))
    nodes = set(nodes)

    declared, called = set(), set()
    for h in headers:
        d, inl, c = parse_header(h)
        print('%s: %d declared, %d inline (%s), calls %d siphon_*'
              % (h, len(d), len(inl), ' '.join(sorted(inl)) or '-',
                 len(c)))
        declared |= d
        called |= c
    check({'siphon_version', 'siphon_domain_create'} <= declared,
          'header parser found the known declarations (%d in all)'
          % len(declared))
    not_prefixed = sorted(n for n in declared if not n.startswith('siphon_'))
    check(not not_prefixed,
          'every declared function is siphon_*: %s'
          % (' '.join(not_prefixed) or 'yes'))

    syms = dyn_symbols(readelf, lib)
    exported = {}
    odd = []
    for name, (ver, default, typ, ndx) in sorted(syms.items()):
        if name in nodes and ndx == 'ABS':
            continue  # GNU ld's symbol for a version definition
        if not (name.startswith('siphon_') and typ == 'FUNC' and
                ver in nodes and default):
            odd.append('%s@%s%s (%s)' % (name, '@' if default else '',
                                         ver, typ))
        exported[name] = ver
    check(not odd, 'every exported symbol is a siphon_* function whose '
          'default version is a node of the script (%s): %s'
          % (' '.join(sorted(nodes)), ' '.join(odd) or 'yes'))

    missing = sorted(declared - set(exported))
    check(not missing, 'every declared function is exported: %s'
          % (' '.join(missing) or 'yes (%d)' % len(declared)))
    extra = sorted(set(exported) - declared)
    check(not extra, 'nothing exported that the headers do not declare: %s'
          % (' '.join(extra) or 'yes'))
    unresolved = sorted(called - set(exported))
    check(not unresolved, 'every siphon_* call of the inline wrappers is '
          'exported: %s' % (' '.join(unresolved) or 'yes (%d)' % len(called)))

    print('%d passed, %d failed' % (passed, failed))
    return 1 if failed else 0


if __name__ == '__main__':
    try:
        sys.exit(main(sys.argv))
    except ValueError as e:
        print('FAIL: %s' % e)
        print('%d passed, %d failed' % (passed, failed + 1))
        sys.exit(1)
