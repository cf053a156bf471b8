# Pluvio - build, test, demo, install.  `make help` lists the targets.

PREFIX      ?= /usr/local
DESTDIR     ?=
BINDIR      ?= $(PREFIX)/bin
LIBDIR      ?= $(PREFIX)/lib/lua/5.1
LUADIR      ?= $(PREFIX)/share/lua/5.1

CC          ?= cc
CFLAGS      ?= -O2 -g
LDFLAGS     ?=
BUILD       ?= build
SANITIZE    ?=
# Warnings fail the project's own builds; the rock (rockspec) builds with
# PL_WERROR= so that the new warnings of a newer compiler do not fail an install.
PL_WERROR   ?= -Werror

DEB_PACKAGES = build-essential pkg-config luajit libluajit-5.1-dev liburing-dev \
               libucx-dev ucx-utils lua-busted luarocks fio

LUAJIT_CFLAGS := $(shell pkg-config --cflags luajit 2>/dev/null)
LUAJIT_LIBS   := $(shell pkg-config --libs luajit 2>/dev/null || echo -lluajit-5.1)

VERSION     = 0.1.0
# -fno-semantic-interposition: nobody interposes libpluvio's functions (only
# pluvio.map's are exported), so a call inside a file may be inlined
# (callgrind: 3 % fewer instructions per 4 KiB read at QD 32)
# The C interface's stamp: a checksum of the FFI region of the header, built
# into the library and written into the cdef, so that Lua modules never
# drive a libpluvio.so of another interface (core.lua compares them).
PL_ABI    := $(shell sed -n '/^\/\* PL_CDEF_BEGIN \*\/$$/,/^\/\* PL_CDEF_END \*\/$$/p' src/pluvio.h | cksum | cut -d' ' -f1)
PL_CFLAGS  = -DPL_VERSION='"$(VERSION)"' -DPL_ABI='"$(PL_ABI)"' -std=c11 -Wall -Wextra $(PL_WERROR) -D_GNU_SOURCE -fPIC \
             -fno-semantic-interposition $(SANITIZE) $(CFLAGS)
CORE_SRC   = src/runtime.c src/tick.c src/timer.c src/error.c src/uring.c src/uring_submit.c src/uring_complete.c src/uring_rest.c src/uring_cancel.c src/uring_file.c src/uring_buf.c \
             src/uring_net.c src/uring_queue.c src/checksum.c src/interrupt.c src/ucx_context.c src/ucx_op.c src/ucx_waitq.c src/ucx_worker.c src/ucx_reactor.c src/ucx_conn.c src/ucx_listener.c src/ucx_addr.c src/ucx_log.c src/ucx_am.c src/ucx_sock.c src/histogram.c
CORE_OBJ   = $(CORE_SRC:src/%.c=$(BUILD)/%.o)
CORE_LIBS  = -luring -lucp -lucs -ldl
LIB        = $(BUILD)/libpluvio.so
HOST       = $(BUILD)/pluvio
CDEF       = lua/pluvio/cdef.lua
LUA_MODULES = $(wildcard lua/pluvio/*.lua)

# Demos, benchmarks and specs keep UCX on loopback unless told otherwise.
UCX_NET_DEVICES ?= lo
export UCX_NET_DEVICES

CPPCHECK   ?= cppcheck
BUSTED      = busted --lua=luajit
SPEC_FLAGS ?=

.PHONY: all rock test demo bench bench-quick install uninstall clean help deps asan-test check-deps lint

C_BENCH    = $(BUILD)/uring_c_bench
FLOOR      = $(BUILD)/uring_floor.so

all: $(LIB) $(HOST) $(CDEF) $(C_BENCH) $(FLOOR) ## (plain `make`) build libpluvio.so, the pluvio host, the FFI cdef, uring_c_bench and uring_floor.so

$(BUILD):
	mkdir -p $(BUILD)

$(BUILD)/%.o: src/%.c src/pluvio.h src/internal.h src/ucx_internal.h src/uring_internal.h | $(BUILD)
	$(CC) $(PL_CFLAGS) -c $< -o $@

$(LIB): $(CORE_OBJ) src/pluvio.map
	$(CC) $(SANITIZE) -shared -Wl,-z,nodelete -Wl,--version-script=src/pluvio.map -Wl,-Bsymbolic-functions \
	    -o $@ $(CORE_OBJ) $(LDFLAGS) $(CORE_LIBS)

$(HOST): src/main.c | $(BUILD)
	$(CC) $(PL_CFLAGS) $(LUAJIT_CFLAGS) -o $@ src/main.c $(LUAJIT_LIBS) -Wl,-E -ldl

# The plain liburing loop the benchmarks compare against (with the
# latency histogram of libpluvio that uring_bench.lua records into too).
$(C_BENCH): examples/uring_c_bench.c src/pluvio.h $(LIB)
	$(CC) $(PL_CFLAGS) -Isrc -o $@ $< -L$(BUILD) $(LDFLAGS) -Wl,-rpath,'$$ORIGIN' -lpluvio -luring

# The same loop cut in two calls for examples/uring_floor.lua (the floor of
# a task per read: LuaJIT resuming a coroutine per read, nothing else).
$(FLOOR): examples/uring_c_bench.c src/pluvio.h $(LIB)
	$(CC) $(PL_CFLAGS) -DURING_FLOOR -fPIC -shared -Isrc -o $@ $< -L$(BUILD) $(LDFLAGS) -Wl,-rpath,'$$ORIGIN' -lpluvio -luring

# The FFI cdef is the marked region of the public header: one source of truth.
$(CDEF): src/pluvio.h Makefile
	{ echo '-- Generated from src/pluvio.h by make; do not edit.'; \
	  echo 'return [==[/* abi $(PL_ABI) */'; \
	  sed -n '/^\/\* PL_CDEF_BEGIN \*\/$$/,/^\/\* PL_CDEF_END \*\/$$/{/PL_CDEF_/d;p}' src/pluvio.h; \
	  echo ']==]'; } > $@

rock: ## (luarocks make's target) a fresh build in BUILD, with the flags luarocks passes
	rm -rf $(BUILD)
	$(MAKE) all

test: all ## build, then run every spec
	@PLUVIO_BUILD=$(BUILD) spec/run $(SPEC_FLAGS)

asan-test: ## run the specs with the C core under AddressSanitizer + UBSan
	$(MAKE) BUILD=build-asan SANITIZE="-fsanitize=address,undefined -fno-omit-frame-pointer" all
	@PLUVIO_BUILD=build-asan spec/run $(SPEC_FLAGS)

demo: check-deps all ## install missing packages (as root), build, then stream a file through io_uring and UCX and verify it
	$(HOST) examples/pipeline.lua

bench: check-deps all ## (6 to 9 minutes) Pluvio vs fio, a C liburing loop and ucx_perftest; writes docs/PERFORMANCE.md
	$(HOST) examples/bench_compare.lua $(BENCH_FLAGS)

bench-quick: check-deps all ## the same in under a minute (1 round, short runs); writes build/PERFORMANCE-quick.md, not docs/
	$(HOST) examples/bench_compare.lua --quick --output $(BUILD)/PERFORMANCE-quick.md $(BENCH_FLAGS)

lint: ## cppcheck the C core (needs cppcheck, which deps leaves out)
	@command -v $(CPPCHECK) >/dev/null || \
	  { echo "make lint: $(CPPCHECK) not found (apt-get install -y cppcheck: make deps leaves it out)" >&2; exit 1; }
	$(CPPCHECK) --enable=warning,style,performance,portability --error-exitcode=1 \
	  --inline-suppr --suppress=missingIncludeSystem -q src/

deps: ## install the Debian packages Pluvio needs (as root), else print the command
	@if [ "$$(id -u)" = 0 ]; then \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $(DEB_PACKAGES); \
	else \
	  echo "run as root:  apt-get install -y $(DEB_PACKAGES)"; \
	fi

# Installs missing packages only when something is missing.
check-deps:
	@missing=""; for p in $(DEB_PACKAGES); do \
	  dpkg-query -W -f='$${Status}' $$p 2>/dev/null | grep -q "ok installed" || missing="$$missing $$p"; \
	done; \
	if [ -n "$$missing" ]; then \
	  echo "missing Debian packages:$$missing"; $(MAKE) --no-print-directory deps; \
	fi

install: all ## install into DESTDIR/PREFIX (default /usr/local) with LuaRocks' layout
	install -d $(DESTDIR)$(BINDIR) $(DESTDIR)$(LIBDIR) $(DESTDIR)$(LUADIR)/pluvio
	install -m 755 $(HOST) $(DESTDIR)$(BINDIR)/pluvio
	install -m 755 $(LIB) $(DESTDIR)$(LIBDIR)/libpluvio.so
	install -m 644 lua/pluvio/*.lua $(DESTDIR)$(LUADIR)/pluvio/

uninstall: ## remove what install put in place
	rm -f $(DESTDIR)$(BINDIR)/pluvio $(DESTDIR)$(LIBDIR)/libpluvio.so
	rm -rf $(DESTDIR)$(LUADIR)/pluvio

clean: ## remove build products
	rm -rf build build-asan build-rock $(CDEF) luacov.*

help: ## list the targets
	@echo "Pluvio make targets:"
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | sed -E 's/:.*## /\t/' | awk -F'\t' '{printf "  %-12s %s\n", $$1, $$2}'
	@echo "Variables: PREFIX=$(PREFIX) DESTDIR= BUILD=$(BUILD) CC=$(CC) CFLAGS='$(CFLAGS)' LDFLAGS='$(LDFLAGS)'"
