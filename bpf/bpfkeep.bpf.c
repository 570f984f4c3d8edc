// SPDX-License-Identifier: GPL-2.0
/*
 * bpfkeep's BPF object: the one translation unit bcc compiles
 * (bpfkeep/progs/loader.py, SOURCE).  The three programs share their maps
 * and bcc makes the maps of one compiled text, so all of them are in one
 * unit, the shared maps defined once (common.bpf.h, guarded); each program
 * keeps its own file.
 *
 * bcc registers programs and rewrites its map syntax (bk_policies.lookup(),
 * bk_sk.sk_storage_get(), ...) only in the text it is handed, never in an
 * #include'd file: it keeps the rewritten main file alone (bcc 0.26,
 * frontends/clang/b_frontend_action.cc: is_rewritable_ext_func,
 * EndSourceFileAction).  A program in an included file is unknown to
 * load_func, and a map call there reaches the verifier as a call through
 * a function pointer, which it refuses.  So the loader hands bcc this file
 * with the "..." includes below written into it (progs/header.py,
 * unit_text); <...> includes are left to the compiler.
 *
 * Compiler errors therefore name lines of that text (/virtual/main.c):
 *   python -c 'from bpfkeep.progs import header as h
 *   print(h.unit_text(h.bpf_dir() / "bpfkeep.bpf.c"))' | cat -n
 * shows them.  #line markers would name the files instead, but bcc adds a
 * line of its own before every function it rewrites and reads the
 * programs' line info (what the verifier's log and bpftool show) from the
 * text it compiled: with markers that info would point at wrong lines.
 */
#include "common.bpf.h"

#include "sockops.bpf.c"
#include "setsockopt.bpf.c"
#include "sweep.bpf.c"
#include "loss.bpf.c"
#include "bypass.bpf.c"
