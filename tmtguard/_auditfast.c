/* tmtguard._auditfast: the audit hook's fast path in C, and two helpers of the guards' slow paths
 * (optional; tmtguard/guards/_audit.py falls back to a Python hook, and the helpers to Python, when
 * this module was not built).
 *
 * Why: a Python audit hook costs CPython ~2,500 instructions per event before the hook's first line
 * runs (the event name turned into a str, an iterator over the hook list, a __cantrace__ attribute
 * lookup, a Python frame). A small pickle names a few globals, each one a pickle.find_class event, so
 * that machinery alone was a third of a guarded pickle.loads. A runtime hook added with
 * PySys_AddAuditHook is a plain C call: events no guard registered cost a string compare or two, and
 * an event whose arguments are in its guard's allow-set (a built-in pickle global) is settled here by
 * one set lookup. Everything else goes to the same Python dispatcher as before.
 *
 * Like a Python hook, it cannot be removed once added. The table holds strong references and never
 * shrinks (unregister clears an entry's handler), so a handler running with the GIL released cannot
 * see its entry freed under it.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <structmember.h>
#include <string.h>
#include <stdlib.h>
#include <limits.h>
#include <sys/stat.h>
#include <fcntl.h>
#include <unistd.h>
#include <errno.h>

#define UNUSED(x) (void)(x)

#define MAX_EVENTS 128

typedef struct {
    char *name;          /* the event name, owned */
    PyObject *pyname;    /* the same as a str, passed to the dispatcher */
    PyObject *allowed;   /* a frozenset of argument tuples the hook lets through itself, or NULL */
    PyObject *handler;   /* the guard's handler, or NULL when unregistered */
    int scope;           /* SCOPE_*: when the handler can act at all (a pre-filter of its own test) */
    PyObject *callers;   /* a frozenset of module names whose own calls the handler lets through, or NULL */
    PyObject *own;       /* ... unless the calling code's file starts with this (tmtguard's folder), or NULL */
} entry_t;

/* A handler registered with a scope returns at once unless a guarded load is on the chain (the
 * ContextVar) or model code exists (a non-empty registry), or, for SCOPE_WIDE / SCOPE_NET_WIDE, the
 * matching process-wide setting is on: the handlers' own first test, made here without entering
 * Python, so application code pays nothing for events that only concern models. */
#define SCOPE_ALWAYS 0
#define SCOPE_MODEL 1
#define SCOPE_WIDE 2
#define SCOPE_NET_WIDE 3

static entry_t table[MAX_EVENTS];
static int n_entries = 0;
static int n_active = 0;
static PyObject *dispatcher = NULL;   /* dispatcher(event, args, handler) */
static PyObject *gate = NULL;         /* gate(what): raises to refuse a change to this table */
static PyInterpreterState *main_interp = NULL;
static int hook_added = 0;
static unsigned long long generation = 0;  /* bumped by every change to the table */
static PyObject *chain_var = NULL;    /* provenance._CHAIN (a ContextVar of a tuple) */
static PyObject *model_code = NULL;   /* provenance._model_code (a dict) */
static int wide_on = 0;               /* TMTGUARD_PROCESS_WIDE */
static int net_wide_on = 0;           /* network.process_wide */

static int model_code_on_stack(void);
static PyObject *str_name;   /* "__name__" (defined with the stack walks below) */
static int trusted_caller(entry_t *e);
static entry_t *reads_entry = NULL;   /* the "open" entry: the file guard's read fast path, below */
static int read_allowed(PyObject *args);

/* 1 when the handler must run, 0 when it would return at once, -1 (no error set) when unsure.
 * The handlers' own test, made here: a guarded load on the chain, or (model code exists in the
 * process) a model code frame on the stack (provenance.model_code_frame, walked in C), or the
 * matching process-wide setting. Application code running while models are loaded, which is most
 * of what a server does, is settled without entering Python. */
static int
in_scope(int scope)
{
    if (scope == SCOPE_ALWAYS || chain_var == NULL || model_code == NULL) {
        return 1;
    }
    if ((scope == SCOPE_WIDE && wide_on) || (scope == SCOPE_NET_WIDE && net_wide_on)) {
        return 1;
    }
    if (!PyDict_Check(model_code)) {
        return 1;
    }
    PyObject *value = NULL;
    if (PyContextVar_Get(chain_var, NULL, &value) < 0) {
        PyErr_Clear();
        return 1;
    }
    if (value != NULL) {
        int on = PyTuple_Check(value) ? PyTuple_GET_SIZE(value) != 0 : 1;
        Py_DECREF(value);
        if (on) {
            return 1;
        }
    }
    if (PyDict_GET_SIZE(model_code) == 0) {
        return 0;
    }
    return model_code_on_stack();
}

/* The table's entry for an event name, or NULL (entries are never removed: unregister clears the
 * handler). An open-addressing index over the names (FNV-1a), a quarter full at most: an event no
 * guard registered (most of them: builtins.id, object.__getattr__, socket.__new__...) costs hashing
 * its name and one empty slot. */
#define SLOTS 512
static unsigned short slots[SLOTS];   /* table index + 1, or 0 */

static unsigned int
name_hash(const char *s)
{
    unsigned int h = 2166136261u;
    while (*s) {
        h ^= (unsigned char)*s++;
        h *= 16777619u;
    }
    return h;
}

/* The first two bytes of every registered name, as a bitmap: most events a process raises (builtins.id,
 * hundreds per transformers load; sys._getframe; object.__getattr__) share no two-byte prefix with a
 * registered one and are rejected with two loads, before the name is hashed. */
static unsigned char prefixes[256][32];

static void
note_prefix(const char *name)
{
    unsigned char a = (unsigned char)name[0], b = a ? (unsigned char)name[1] : 0;
    prefixes[a][b >> 3] |= (unsigned char)(1u << (b & 7));
}

static entry_t *
find(const char *event)
{
    unsigned char a = (unsigned char)event[0], b = a ? (unsigned char)event[1] : 0;
    if (!(prefixes[a][b >> 3] & (1u << (b & 7)))) {
        return NULL;
    }
    unsigned int i = name_hash(event) & (SLOTS - 1);
    while (slots[i] != 0) {
        entry_t *e = &table[slots[i] - 1];
        if (e->name[0] == event[0] && strcmp(e->name, event) == 0) {
            return e;
        }
        i = (i + 1) & (SLOTS - 1);
    }
    return NULL;
}

static void
index_entry(int n)
{
    note_prefix(table[n].name);
    unsigned int i = name_hash(table[n].name) & (SLOTS - 1);
    while (slots[i] != 0) {
        i = (i + 1) & (SLOTS - 1);
    }
    slots[i] = (unsigned short)(n + 1);
}

static int
hook(const char *event, PyObject *args, void *userData)
{
    (void)userData;
    if (n_active == 0) {
        return 0;
    }
    entry_t *e = find(event);
    if (e == NULL || e->handler == NULL) {
        return 0;
    }
    /* tmtguard's objects belong to the main interpreter; a Python hook is per interpreter and never
     * ran in others either. */
    if (PyInterpreterState_Get() != main_interp) {
        return 0;
    }
    /* a trusted caller first: one frame's module name, where in_scope may walk the whole stack (typing
     * evaluating annotations raises dozens of compile and exec events a transformers load) */
    if (e->callers != NULL && trusted_caller(e) == 1) {
        return 0;
    }
    if (e->scope != SCOPE_ALWAYS && in_scope(e->scope) == 0) {
        return 0;
    }
    if (e == reads_entry && read_allowed(args) == 1) {
        return 0;
    }
    if (e->allowed != NULL && args != NULL) {
        int found = PySet_Contains(e->allowed, args);
        if (found == 1) {
            return 0;
        }
        if (found < 0) {
            PyErr_Clear();  /* unhashable arguments: the handler decides */
        }
    }
    if (dispatcher == NULL) {
        return 0;
    }
    PyObject *handler = e->handler;
    PyObject *dispatch = dispatcher;
    PyObject *pyname = e->pyname;
    Py_INCREF(handler);
    Py_INCREF(dispatch);
    Py_INCREF(pyname);
    PyObject *result = PyObject_CallFunctionObjArgs(
        dispatch, pyname, args != NULL ? args : Py_None, handler, NULL);
    Py_DECREF(pyname);
    Py_DECREF(dispatch);
    Py_DECREF(handler);
    if (result == NULL) {
        return -1;
    }
    Py_DECREF(result);
    return 0;
}

/* Every change to the table asks the gate first (tmtguard's tamper guard: code inside a guarded load
 * or model code may not change it). */
static int
check_gate(const char *what)
{
    if (gate == NULL) {
        return 0;
    }
    PyObject *g = gate;
    Py_INCREF(g);
    PyObject *r = PyObject_CallFunction(g, "s", what);
    Py_DECREF(g);
    if (r == NULL) {
        return -1;
    }
    Py_DECREF(r);
    return 0;
}

static PyObject *
fast_install(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    UNUSED(module);
    if (nargs != 2 || !PyCallable_Check(args[0]) || !(args[1] == Py_None || PyCallable_Check(args[1]))) {
        PyErr_SetString(PyExc_TypeError, "install(dispatcher, gate)");
        return NULL;
    }
    if (check_gate("install") < 0) {
        return NULL;
    }
    PyObject *dispatch = args[0];
    Py_INCREF(dispatch);
    Py_XSETREF(dispatcher, dispatch);
    if (args[1] == Py_None) {
        Py_CLEAR(gate);
    }
    else {
        Py_INCREF(args[1]);
        Py_XSETREF(gate, args[1]);
    }
    generation++;
    if (!hook_added) {
        main_interp = PyInterpreterState_Get();
        if (PySys_AddAuditHook(hook, NULL) < 0) {
            return NULL;
        }
        hook_added = 1;
    }
    Py_RETURN_NONE;
}

static PyObject *
fast_register(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    UNUSED(module);
    if (nargs < 3 || nargs > 6) {
        PyErr_SetString(PyExc_TypeError, "register(event, handler, allowed[, scope[, callers, own]])");
        return NULL;
    }
    PyObject *callers = nargs > 4 && args[4] != Py_None ? args[4] : NULL;
    PyObject *own = nargs > 5 && args[5] != Py_None ? args[5] : NULL;
    if ((callers != NULL && !PyFrozenSet_Check(callers)) || (own != NULL && !PyUnicode_Check(own))) {
        PyErr_SetString(PyExc_TypeError, "callers must be a frozenset or None, own a str or None");
        return NULL;
    }
    PyObject *pyname = args[0], *handler = args[1], *allowed = args[2];
    int scope = SCOPE_ALWAYS;
    if (nargs >= 4) {
        long v = PyLong_AsLong(args[3]);
        if (v == -1 && PyErr_Occurred()) {
            return NULL;
        }
        if (v < SCOPE_ALWAYS || v > SCOPE_NET_WIDE) {
            PyErr_SetString(PyExc_ValueError, "unknown scope");
            return NULL;
        }
        scope = (int)v;
    }
    if (!PyUnicode_Check(pyname)) {
        PyErr_SetString(PyExc_TypeError, "event must be a str");
        return NULL;
    }
    if (allowed == Py_None) {
        allowed = NULL;
    }
    else if (!PyFrozenSet_Check(allowed)) {
        PyErr_SetString(PyExc_TypeError, "allowed must be a frozenset or None");
        return NULL;
    }
    if (check_gate("register") < 0) {
        return NULL;
    }
    const char *name = PyUnicode_AsUTF8(pyname);
    if (name == NULL) {
        return NULL;
    }
    if (name[0] == '\0') {
        PyErr_SetString(PyExc_ValueError, "empty event name");
        return NULL;
    }
    entry_t *e = find(name);
    if (e == NULL) {
        if (n_entries >= MAX_EVENTS) {
            PyErr_SetString(PyExc_OverflowError, "too many audit events registered");
            return NULL;
        }
        size_t len = strlen(name);
        char *copy = PyMem_RawMalloc(len + 1);
        if (copy == NULL) {
            return PyErr_NoMemory();
        }
        memcpy(copy, name, len + 1);
        e = &table[n_entries];
        e->name = copy;
        Py_INCREF(pyname);
        e->pyname = pyname;
        e->allowed = NULL;
        e->handler = NULL;
        e->scope = SCOPE_ALWAYS;
        e->callers = NULL;
        e->own = NULL;
        index_entry(n_entries);
        n_entries++;
    }
    if (e->handler == NULL) {
        n_active++;
    }
    generation++;
    Py_XINCREF(allowed);
    Py_INCREF(handler);
    /* Old references go only after the new ones are in place: a hook running on another thread
     * sees either the old pair or the new one. */
    Py_XINCREF(callers);
    Py_XINCREF(own);
    PyObject *old_allowed = e->allowed, *old_handler = e->handler, *old_callers = e->callers, *old_own = e->own;
    e->allowed = allowed;
    e->handler = handler;
    e->scope = scope;
    e->callers = callers;
    e->own = own;
    Py_XDECREF(old_allowed);
    Py_XDECREF(old_handler);
    Py_XDECREF(old_callers);
    Py_XDECREF(old_own);
    Py_RETURN_NONE;
}

static PyObject *
fast_unregister(PyObject *module, PyObject *pyname)
{
    UNUSED(module);
    if (check_gate("unregister") < 0) {
        return NULL;
    }
    const char *name = PyUnicode_AsUTF8(pyname);
    if (name == NULL) {
        return NULL;
    }
    entry_t *e = find(name);
    if (e != NULL && e->handler != NULL) {
        PyObject *old_allowed = e->allowed, *old_handler = e->handler;
        e->handler = NULL;
        e->allowed = NULL;
        n_active--;
        generation++;
        Py_XDECREF(old_allowed);
        Py_XDECREF(old_handler);
    }
    Py_RETURN_NONE;
}

static PyObject *
fast_lookup(PyObject *module, PyObject *pyname)
{
    UNUSED(module);
    const char *name = PyUnicode_AsUTF8(pyname);
    if (name == NULL) {
        return NULL;
    }
    entry_t *e = find(name);
    if (e != NULL && e->handler != NULL) {
        return Py_BuildValue("(OO)", e->allowed != NULL ? e->allowed : Py_None, e->handler);
    }
    Py_RETURN_NONE;
}

static PyObject *
fast_set_scope(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    UNUSED(module);
    if (nargs != 2 || !PyContextVar_CheckExact(args[0]) || !PyDict_Check(args[1])) {
        PyErr_SetString(PyExc_TypeError, "set_scope(contextvar, dict)");
        return NULL;
    }
    if (check_gate("set_scope") < 0) {
        return NULL;
    }
    Py_INCREF(args[0]);
    Py_INCREF(args[1]);
    Py_XSETREF(chain_var, args[0]);
    Py_XSETREF(model_code, args[1]);
    generation++;
    Py_RETURN_NONE;
}

static PyObject *
fast_set_wide(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    UNUSED(module);
    if (nargs != 2) {
        PyErr_SetString(PyExc_TypeError, "set_wide(kind, on)");
        return NULL;
    }
    long kind = PyLong_AsLong(args[0]);
    int on = PyObject_IsTrue(args[1]);
    if ((kind == -1 && PyErr_Occurred()) || on < 0) {
        return NULL;
    }
    if (check_gate("set_wide") < 0) {
        return NULL;
    }
    if (kind == SCOPE_WIDE) {
        wide_on = on;
    }
    else if (kind == SCOPE_NET_WIDE) {
        net_wide_on = on;
    }
    else {
        PyErr_SetString(PyExc_ValueError, "kind is SCOPE_WIDE or SCOPE_NET_WIDE");
        return NULL;
    }
    generation++;
    Py_RETURN_NONE;
}

static PyObject *
fast_wide(PyObject *module, PyObject *unused)
{
    UNUSED(module);
    UNUSED(unused);
    return Py_BuildValue("(ii)", wide_on, net_wide_on);
}

static PyObject *
fast_generation(PyObject *module, PyObject *unused)
{
    UNUSED(module);
    UNUSED(unused);
    return PyLong_FromUnsignedLongLong(generation);
}

/* identical(entries, pairs) -> -1 when every entries[i] = (owner, attr, value) has
 * owner.__dict__[attr] is value and every pairs[j] = (obj, cls) has type(obj) is cls; else the index
 * of the first entry (or len(entries) + j for a pair) that does not, or that C cannot read (an owner
 * that is neither a module nor a class): the caller looks closer. The tamper guard runs this before
 * every decision of the import, process, code, native and file guards. */
static PyObject *
fast_identical(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    UNUSED(module);
    if (nargs != 2 || !PyList_Check(args[0]) || !PyList_Check(args[1])) {
        PyErr_SetString(PyExc_TypeError, "identical(list, list)");
        return NULL;
    }
    PyObject *entries = args[0], *pairs = args[1];
    Py_ssize_t n = PyList_GET_SIZE(entries);
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *t = PyList_GET_ITEM(entries, i);
        if (!PyTuple_Check(t) || PyTuple_GET_SIZE(t) != 3) {
            return PyLong_FromSsize_t(i);
        }
        PyObject *owner = PyTuple_GET_ITEM(t, 0);
        PyObject *dict;
        if (PyType_Check(owner)) {
            dict = ((PyTypeObject *)owner)->tp_dict;
        }
        else if (PyModule_Check(owner)) {
            dict = PyModule_GetDict(owner);
        }
        else {
            return PyLong_FromSsize_t(i);
        }
        if (dict == NULL || !PyDict_Check(dict)) {
            return PyLong_FromSsize_t(i);
        }
        PyObject *current = PyDict_GetItemWithError(dict, PyTuple_GET_ITEM(t, 1));  /* borrowed */
        if (current == NULL && PyErr_Occurred()) {
            PyErr_Clear();
        }
        if (current != PyTuple_GET_ITEM(t, 2)) {
            return PyLong_FromSsize_t(i);
        }
    }
    Py_ssize_t m = PyList_GET_SIZE(pairs);
    for (Py_ssize_t j = 0; j < m; j++) {
        PyObject *t = PyList_GET_ITEM(pairs, j);
        if (!PyTuple_Check(t) || PyTuple_GET_SIZE(t) != 2
                || (PyObject *)Py_TYPE(PyTuple_GET_ITEM(t, 0)) != PyTuple_GET_ITEM(t, 1)) {
            return PyLong_FromSsize_t(n + j);
        }
    }
    return PyLong_FromLong(-1);
}

/* realpath(path) -> the C library's realpath(3) of an existing path, or None (a component does not
 * exist, or another error): the file guard then falls back to os.path.realpath, which also resolves
 * paths that do not exist yet. Same result for existing paths, without a Python-level lstat per
 * component.
 *
 * realpath(3) reads every component of the path (a readlink(2) each: ~8 us for a path 7 deep on a VM),
 * and the guards resolve every path a load or model code opens. For a normalized absolute path whose
 * last component is not a symbolic link, the real path is the real path of its folder plus its name;
 * the folder's is kept, with the device and inode stat(2) finds at that folder. It is used again only
 * while stat(2) of the folder still finds the same directory (a component swapped for a link to
 * another directory changes that), so a resolution costs two lstat(2) calls (the folder's and the
 * name's) instead of a readlink(2) per component; a folder not known yet is resolved the same way
 * from its own folder, one more lstat(2) a level. */
static PyObject *dir_cache = NULL;   /* folder (bytes) -> (real folder, st_dev, st_ino) */
/* Its value tuples, like provenance.file_digest's keys (key_of), hold no container, so they are built
 * untracked by the cyclic collector (what its first collection would do to them). A tracked tuple
 * inserted into a cache dict the collector has untracked (every key and value atomic) tracks the dict
 * again as a new object: the next young collection then walks the whole cache, once per model load
 * (measured: the 500-1,000 entries of these two caches made each guarded load's collection +60 us). */
#define DIR_CACHE_MAX 4096

static int
plain_absolute(const char *p, size_t n)
{
    if (n < 2 || p[0] != '/' || p[n - 1] == '/') {
        return 0;
    }
    for (size_t i = 0; i + 1 < n; i++) {
        if (p[i] == '/' && (p[i + 1] == '/' || (p[i + 1] == '.' && (i + 2 == n || p[i + 2] == '/'
                || (p[i + 2] == '.' && (i + 3 == n || p[i + 3] == '/')))))) {
            return 0;
        }
    }
    return 1;
}

/* realpath(3) of p as a str, or NULL with no error set (its buffer kept out of the recursive walk below) */
static PyObject *
libc_realpath(const char *p)
{
    char buf[PATH_MAX];
    char *resolved;
    Py_BEGIN_ALLOW_THREADS
    resolved = realpath(p, buf);
    Py_END_ALLOW_THREADS
    PyObject *out = resolved != NULL ? PyUnicode_DecodeFSDefault(buf) : NULL;
    if (out == NULL) {
        PyErr_Clear();
    }
    return out;
}

static PyObject *cached_realpath_at(const char *p, size_t n, int depth, int *missing, const struct stat *known);

/* new ref, NULL with no error set: not applicable; *missing set when the path does not exist (then
 * realpath(3) cannot resolve it either) */
static PyObject *
cached_realpath(const char *p, size_t n, int *missing)
{
    *missing = 0;
    return cached_realpath_at(p, n, 0, missing, NULL);
}

/* ``known``: lstat(2) of p, when the level below has it (p is that level's folder) */
static PyObject *
cached_realpath_at(const char *p, size_t n, int depth, int *missing, const struct stat *known)
{
    const char *slash = strrchr(p, '/');
    size_t dlen = (size_t)(slash - p);
    if (dlen == 0 || dlen >= PATH_MAX) {
        return NULL;
    }
    char dir[PATH_MAX];
    memcpy(dir, p, dlen);
    dir[dlen] = '\0';
    struct stat st, dlst, lst;
    int ok, err = 0;
    Py_BEGIN_ALLOW_THREADS
    /* the folder by lstat(2): when it is no link, that is its stat(2) as well, and the level above
     * (resolving the folder itself) takes it as the lstat(2) of its name: one call a level */
    ok = lstat(dir, &dlst) == 0;
    if (ok) {
        if (S_ISLNK(dlst.st_mode)) {
            ok = stat(dir, &st) == 0;
        }
        else {
            st = dlst;
        }
    }
    if (ok) {
        if (known != NULL) {
            lst = *known;
        }
        else {
            ok = lstat(p, &lst) == 0;
        }
    }
    if (!ok) {
        err = errno;
    }
    Py_END_ALLOW_THREADS
    if (!ok) {
        *missing = depth == 0 && (err == ENOENT || err == ENOTDIR);
        return NULL;
    }
    if (S_ISLNK(lst.st_mode) || !S_ISDIR(st.st_mode)) {
        return NULL;
    }
    if (dir_cache == NULL && (dir_cache = PyDict_New()) == NULL) {
        PyErr_Clear();
        return NULL;
    }
    PyObject *key = PyBytes_FromStringAndSize(dir, (Py_ssize_t)dlen);
    if (key == NULL) {
        PyErr_Clear();
        return NULL;
    }
    PyObject *real = NULL;
    PyObject *entry = PyDict_GetItemWithError(dir_cache, key);
    if (entry != NULL && PyTuple_Check(entry) && PyTuple_GET_SIZE(entry) == 3
            && PyLong_AsUnsignedLongLong(PyTuple_GET_ITEM(entry, 1)) == (unsigned long long)st.st_dev
            && PyLong_AsUnsignedLongLong(PyTuple_GET_ITEM(entry, 2)) == (unsigned long long)st.st_ino) {
        real = PyTuple_GET_ITEM(entry, 0);
        Py_INCREF(real);
    }
    if (PyErr_Occurred()) {
        PyErr_Clear();
    }
    if (real == NULL) {
        /* the folder's own folder may be known (a new model's snapshot or modules-cache folder
         * under a cache resolved before): stat(2) + lstat(2) a level instead of a readlink(2) for
         * every component; realpath(3) when a component is a link or the walk reaches the root */
        if (depth < 6) {  /* 4 KB of stack a level */
            real = cached_realpath_at(dir, dlen, depth + 1, missing, &dlst);
        }
        if (real == NULL && (real = libc_realpath(dir)) == NULL) {
            Py_DECREF(key);
            return NULL;
        }
        if (PyDict_GET_SIZE(dir_cache) >= DIR_CACHE_MAX) {
            PyDict_Clear(dir_cache);
        }
        PyObject *value = Py_BuildValue("(OKK)", real, (unsigned long long)st.st_dev,
                                        (unsigned long long)st.st_ino);
        if (value != NULL) {
            PyObject_GC_UnTrack(value);  /* see the comment at dir_cache */
        }
        if (value == NULL || PyDict_SetItem(dir_cache, key, value) < 0) {
            PyErr_Clear();
        }
        Py_XDECREF(value);
    }
    Py_DECREF(key);
    /* "/name", joined to the real folder (the root folder "/" takes the name alone) */
    PyObject *name = PyUnicode_DecodeFSDefaultAndSize(slash + (PyUnicode_GET_LENGTH(real) == 1),
                                                      (Py_ssize_t)(n - dlen - (PyUnicode_GET_LENGTH(real) == 1)));
    if (name == NULL) {
        PyErr_Clear();
        Py_DECREF(real);
        return NULL;
    }
    PyObject *out = PyUnicode_Concat(real, name);
    Py_DECREF(real);
    Py_DECREF(name);
    if (out == NULL) {
        PyErr_Clear();
    }
    return out;
}

/* the real path of p (n bytes): from the folder cache when p is a plain absolute path, else
 * realpath(3); NULL with no error set when it does not resolve (a missing path: at once) */
static PyObject *
resolve(const char *p, size_t n)
{
    if (plain_absolute(p, n)) {
        int missing;
        PyObject *out = cached_realpath(p, n, &missing);
        if (out != NULL || missing) {
            return out;
        }
    }
    return libc_realpath(p);
}

static PyObject *
fast_realpath(PyObject *module, PyObject *arg)
{
    UNUSED(module);
    PyObject *bytes = NULL;
    if (!PyUnicode_FSConverter(arg, &bytes)) {
        return NULL;
    }
    PyObject *out = resolve(PyBytes_AS_STRING(bytes), (size_t)PyBytes_GET_SIZE(bytes));
    Py_DECREF(bytes);
    if (out == NULL) {
        Py_RETURN_NONE;
    }
    return out;
}

/* The file guard's read fast path. Inside a guarded load or with model code on the stack, every
 * open raises an "open" event the file guard decides; most are reads the guard allows whoever acts: a
 * file under the interpreter's installation, a Hugging Face cache or a common system file, with no
 * secret in its given or real path (tmtguard/guards/files.py, _check). Entering Python for each one
 * (the dispatcher, the handler, the path tests) cost ~25,000 instructions; a remote-code load makes a
 * dozen such reads. The same test is made here, with the file guard's own settings: files.py keeps them
 * in _settings_memo = [key, settings, stamp], and the stamp says what they were computed from (the
 * os.environ write count, the Hugging Face modules' settings, compared by identity). Anything else,
 * settings computed for another environment or modules, a write, a path that is not a plain absolute
 * str (or os.PathLike giving one), a path that does not resolve, a secret prefix: the file guard
 * decides, as before. This only ever lets through what the file guard itself lets through at once. */
static PyObject *reads_env = NULL;      /* provenance.environment_changes: item 0 counts os.environ writes */
static PyObject *reads_sources = NULL;  /* ((module name, (attribute, ...)), ...): what else the settings read */
static PyObject *reads_memo = NULL;     /* files._settings_memo */
#define WRITE_FLAGS (O_WRONLY | O_RDWR | O_APPEND | O_CREAT | O_TRUNC)

/* 1 when the settings were computed for the current environment and modules */
static int
reads_current(PyObject *stamp)
{
    if (!PyTuple_Check(stamp) || PyTuple_GET_SIZE(stamp) != 2 || !PyList_Check(reads_env)
            || PyList_GET_SIZE(reads_env) < 1 || PyList_GET_ITEM(reads_env, 0) != PyTuple_GET_ITEM(stamp, 0)) {
        return 0;
    }
    PyObject *values = PyTuple_GET_ITEM(stamp, 1);
    PyObject *modules = PySys_GetObject("modules");  /* borrowed */
    if (!PyTuple_Check(values) || modules == NULL || !PyDict_Check(modules) || !PyTuple_Check(reads_sources)) {
        return 0;
    }
    Py_ssize_t k = 0, nvalues = PyTuple_GET_SIZE(values);
    for (Py_ssize_t i = 0; i < PyTuple_GET_SIZE(reads_sources); i++) {
        PyObject *source = PyTuple_GET_ITEM(reads_sources, i);
        if (!PyTuple_Check(source) || PyTuple_GET_SIZE(source) != 2 || !PyTuple_Check(PyTuple_GET_ITEM(source, 1))) {
            return 0;
        }
        PyObject *m = PyDict_GetItemWithError(modules, PyTuple_GET_ITEM(source, 0));  /* borrowed */
        PyObject *d = NULL;
        if (m != NULL) {
            if (!PyModule_Check(m) || (d = PyModule_GetDict(m)) == NULL) {
                PyErr_Clear();
                return 0;
            }
        }
        else if (PyErr_Occurred()) {
            PyErr_Clear();
            return 0;
        }
        PyObject *attrs = PyTuple_GET_ITEM(source, 1);
        for (Py_ssize_t j = 0; j < PyTuple_GET_SIZE(attrs); j++, k++) {
            PyObject *v = d != NULL ? PyDict_GetItemWithError(d, PyTuple_GET_ITEM(attrs, j)) : NULL;
            if (v == NULL) {
                if (PyErr_Occurred()) {
                    PyErr_Clear();
                    return 0;
                }
                v = Py_None;
            }
            if (k >= nvalues || PyTuple_GET_ITEM(values, k) != v) {
                return 0;
            }
        }
    }
    return k == nvalues;
}

/* 1 when str ``s`` starts with one of the str in tuple ``prefixes``, 0 when not, -1 when unsure */
static int
starts_with_any(PyObject *s, PyObject *prefixes)
{
    if (!PyTuple_Check(prefixes)) {
        return -1;
    }
    for (Py_ssize_t i = 0; i < PyTuple_GET_SIZE(prefixes); i++) {
        PyObject *prefix = PyTuple_GET_ITEM(prefixes, i);
        if (!PyUnicode_Check(prefix)) {
            return -1;
        }
        Py_ssize_t r = PyUnicode_Tailmatch(s, prefix, 0, PY_SSIZE_T_MAX, -1);
        if (r != 0) {
            if (r < 0) {
                PyErr_Clear();
            }
            return r > 0 ? 1 : -1;
        }
    }
    return 0;
}

static int
read_allowed(PyObject *args)  /* 1: the file guard would let this open through at once; 0: ask it */
{
    if (reads_memo == NULL || args == NULL || !PyTuple_Check(args) || PyTuple_GET_SIZE(args) < 1) {
        return 0;
    }
    Py_ssize_t nargs = PyTuple_GET_SIZE(args);
    if (nargs > 1 && PyUnicode_Check(PyTuple_GET_ITEM(args, 1))) {  /* open()'s mode; os.open gives None */
        Py_ssize_t len;
        const char *mode = PyUnicode_AsUTF8AndSize(PyTuple_GET_ITEM(args, 1), &len);
        if (mode == NULL) {
            PyErr_Clear();
            return 0;
        }
        for (Py_ssize_t i = 0; i < len; i++) {
            if (mode[i] == 'w' || mode[i] == 'a' || mode[i] == 'x' || mode[i] == '+') {
                return 0;
            }
        }
    }
    if (nargs > 2 && PyLong_Check(PyTuple_GET_ITEM(args, 2))) {
        long flags = PyLong_AsLong(PyTuple_GET_ITEM(args, 2));
        if ((flags == -1 && PyErr_Occurred()) || (flags & WRITE_FLAGS)) {
            PyErr_Clear();
            return 0;
        }
    }
    PyObject *given = PyTuple_GET_ITEM(args, 0);
    if (PyUnicode_CheckExact(given)) {
        Py_INCREF(given);
    }
    else if (PyUnicode_Check(given) || PyBytes_Check(given) || PyLong_Check(given) || given == Py_None) {
        return 0;
    }
    else {
        given = PyOS_FSPath(given);  /* os.PathLike (pathlib): what the file guard decodes too */
        if (given == NULL || !PyUnicode_CheckExact(given)) {
            PyErr_Clear();
            Py_XDECREF(given);
            return 0;
        }
    }
    int verdict = 0;
    PyObject *bytes = PyUnicode_EncodeFSDefault(given);
    PyObject *real = NULL;
    if (bytes == NULL) {
        PyErr_Clear();
        goto done;
    }
    const char *p = PyBytes_AS_STRING(bytes);
    size_t n = (size_t)PyBytes_GET_SIZE(bytes);
    if (strlen(p) != n || !plain_absolute(p, n)) {
        goto done;  /* an embedded NUL, a relative or unnormalized path: the file guard's abspath */
    }
    if ((real = resolve(p, n)) == NULL) {
        goto done;  /* missing (nothing to read there yet) or unresolvable: the file guard decides */
    }
    /* the settings only now: the GIL was released above, and the memo may have been replaced */
    if (!PyList_Check(reads_memo) || PyList_GET_SIZE(reads_memo) != 3) {
        goto done;
    }
    PyObject *settings = PyList_GET_ITEM(reads_memo, 1);
    if (!reads_current(PyList_GET_ITEM(reads_memo, 2)) || !PyTuple_Check(settings) || PyTuple_GET_SIZE(settings) < 5) {
        goto done;
    }
    if (starts_with_any(given, PyTuple_GET_ITEM(settings, 0)) != 0
            || starts_with_any(real, PyTuple_GET_ITEM(settings, 0)) != 0) {
        goto done;  /* could be a secret: the file guard matches it */
    }
    int readable = starts_with_any(real, PyTuple_GET_ITEM(settings, 3));
    if (readable == 0 && PyFrozenSet_Check(PyTuple_GET_ITEM(settings, 4))) {
        readable = PySet_Contains(PyTuple_GET_ITEM(settings, 4), real);
        if (readable < 0) {
            PyErr_Clear();
        }
    }
    verdict = readable == 1;
done:
    Py_XDECREF(real);
    Py_XDECREF(bytes);
    Py_DECREF(given);
    return verdict;
}

/* set_reads(env, sources, memo): turn the read fast path on (None: off) for the "open" entry */
static PyObject *
fast_set_reads(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    UNUSED(module);
    if (nargs == 1 && args[0] == Py_None) {
        if (check_gate("set_reads") < 0) {
            return NULL;
        }
        reads_entry = NULL;
        Py_CLEAR(reads_memo);
        Py_RETURN_NONE;
    }
    if (nargs != 3 || !PyList_Check(args[0]) || !PyTuple_Check(args[1]) || !PyList_Check(args[2])) {
        PyErr_SetString(PyExc_TypeError, "set_reads(env list, sources tuple, memo list) or set_reads(None)");
        return NULL;
    }
    entry_t *e = find("open");
    if (e == NULL || e->handler == NULL) {
        PyErr_SetString(PyExc_RuntimeError, "set_reads: no handler registered for open");
        return NULL;
    }
    if (check_gate("set_reads") < 0) {
        return NULL;
    }
    Py_INCREF(args[0]);
    Py_INCREF(args[1]);
    Py_INCREF(args[2]);
    Py_XSETREF(reads_env, args[0]);
    Py_XSETREF(reads_sources, args[1]);
    Py_XSETREF(reads_memo, args[2]);
    reads_entry = e;
    generation++;
    Py_RETURN_NONE;
}

/* (st_dev, st_ino, st_size, st_mtime_ns): the key provenance.file_digest files a digest under,
 * untracked by the cyclic collector (see the cache comment at dir_cache) */
static PyObject *
key_of(const struct stat *st)
{
    long long mtime_ns = (long long)st->st_mtim.tv_sec * 1000000000LL + (long long)st->st_mtim.tv_nsec;
    PyObject *key = Py_BuildValue("(KKLL)", (unsigned long long)st->st_dev, (unsigned long long)st->st_ino,
                                  (long long)st->st_size, mtime_ns);
    if (key != NULL) {
        PyObject_GC_UnTrack(key);
    }
    return key;
}

/* stat_key(path or fd) -> (st_dev, st_ino, st_size, st_mtime_ns) of stat(2) / fstat(2): what
 * provenance.file_digest files a digest under, checked on every lookup. os.stat builds a 19-field
 * stat_result (float times, nanosecond times by big-int arithmetic) for the four numbers. OSError as
 * os.stat raises it. */
static PyObject *
fast_stat_key(PyObject *module, PyObject *arg)
{
    UNUSED(module);
    struct stat st;
    int rc;
    if (PyLong_Check(arg)) {
        long v = PyLong_AsLong(arg);
        if (v == -1 && PyErr_Occurred()) {
            return NULL;
        }
        if (v < 0 || v > INT_MAX) {
            errno = EBADF;
            return PyErr_SetFromErrno(PyExc_OSError);
        }
        int fd = (int)v;
        Py_BEGIN_ALLOW_THREADS
        rc = fstat(fd, &st);
        Py_END_ALLOW_THREADS
        if (rc != 0) {
            return PyErr_SetFromErrno(PyExc_OSError);
        }
    }
    else {
        PyObject *bytes = NULL;
        if (!PyUnicode_FSConverter(arg, &bytes)) {
            return NULL;
        }
        Py_BEGIN_ALLOW_THREADS
        rc = stat(PyBytes_AS_STRING(bytes), &st);
        Py_END_ALLOW_THREADS
        if (rc != 0) {
            PyObject *err = PyErr_SetFromErrnoWithFilenameObject(PyExc_OSError, arg);
            Py_DECREF(bytes);
            return err;
        }
        Py_DECREF(bytes);
    }
    return key_of(&st);
}

/* read_file(path, limit) -> (stat_key, bytes) of a regular file smaller than ``limit`` bytes, read
 * with open(2), fstat(2), read(2) and close(2); None when it is larger (the caller reads it in
 * blocks). For tmtguard's own reads (hashing a code file): os.open raises an audit event, and inside
 * a guarded load each one is a call into the guards' Python handlers, which then stand aside. OSError
 * as the os functions raise it. */
static PyObject *
fast_read_file(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    UNUSED(module);
    if (nargs != 2) {
        PyErr_SetString(PyExc_TypeError, "read_file(path, limit)");
        return NULL;
    }
    long long limit = PyLong_AsLongLong(args[1]);
    if (limit == -1 && PyErr_Occurred()) {
        return NULL;
    }
    PyObject *bytes = NULL;
    if (!PyUnicode_FSConverter(args[0], &bytes)) {
        return NULL;
    }
    int fd;
    struct stat st;
    int err = 0;
    Py_BEGIN_ALLOW_THREADS
    fd = open(PyBytes_AS_STRING(bytes), O_RDONLY | O_CLOEXEC | O_NONBLOCK);  /* a FIFO must not block */
    if (fd < 0) {
        err = errno;
    }
    else if (fstat(fd, &st) != 0) {
        err = errno;
        close(fd);
    }
    Py_END_ALLOW_THREADS
    if (err != 0) {
        errno = err;
        PyObject *r = PyErr_SetFromErrnoWithFilenameObject(PyExc_OSError, args[0]);
        Py_DECREF(bytes);
        return r;
    }
    Py_DECREF(bytes);
    if (!S_ISREG(st.st_mode) || (long long)st.st_size >= limit) {
        close(fd);
        Py_RETURN_NONE;
    }
    /* the size fstat(2) saw, +1 to see the end; a file that grew since is read to its end in blocks */
    Py_ssize_t cap = (Py_ssize_t)st.st_size + 1, used = 0;
    PyObject *data = PyBytes_FromStringAndSize(NULL, cap);
    if (data == NULL) {
        close(fd);
        return NULL;
    }
    for (;;) {
        if (used == cap) {
            if (cap >= (Py_ssize_t)limit) {
                Py_DECREF(data);
                close(fd);
                Py_RETURN_NONE;
            }
            cap *= 2;
            if (_PyBytes_Resize(&data, cap) < 0) {
                close(fd);
                return NULL;
            }
        }
        ssize_t n;
        Py_BEGIN_ALLOW_THREADS
        n = read(fd, PyBytes_AS_STRING(data) + used, (size_t)(cap - used));
        if (n < 0) {
            err = errno;
        }
        Py_END_ALLOW_THREADS
        if (n < 0) {
            if (err == EINTR) {
                if (PyErr_CheckSignals() < 0) {
                    Py_DECREF(data);
                    close(fd);
                    return NULL;
                }
                continue;
            }
            Py_DECREF(data);
            close(fd);
            errno = err;
            return PyErr_SetFromErrnoWithFilenameObject(PyExc_OSError, args[0]);
        }
        if (n == 0) {
            break;
        }
        used += n;
        if (used == (Py_ssize_t)st.st_size && used < cap) {
            break;  /* a short read of a regular file at the size fstat(2) saw: its end, no read(2) to confirm */
        }
    }
    close(fd);
    if (_PyBytes_Resize(&data, used) < 0) {
        return NULL;
    }
    PyObject *key = key_of(&st);
    if (key == NULL) {
        Py_DECREF(data);
        return NULL;
    }
    return Py_BuildValue("(NN)", key, data);
}

/* --- stack walks ----------------------------------------------------------------------------------
 *
 * The guards' per-decision stack walks (provenance.model_code_frame, _library_start_up, the lazy
 * pickle frames), in C: reading frame.f_code from Python raises an audit event per frame on 3.11, and
 * a Python loop over 50-100 frames costs more than the decision it serves. Same logic as the Python
 * versions kept beside them in provenance.py (used when this module was not built). */

static PyObject *str_file = NULL;      /* "__file__" */
static PyObject *str_name = NULL;      /* "__name__" */

static PyFrameObject *
frame_back(PyFrameObject *f)   /* steals f, returns a new reference or NULL */
{
    PyFrameObject *back = PyFrame_GetBack(f);
    Py_DECREF(f);
    return back;
}

static PyFrameObject *
caller_frame(long skip)   /* the calling Python function's frame, ``skip`` frames up (new ref) */
{
    PyFrameObject *f = PyEval_GetFrame();
    Py_XINCREF(f);
    for (long i = 0; i < skip && f != NULL; i++) {
        f = frame_back(f);
    }
    return f;
}

/* registry.get(key) as a borrowed reference, or NULL; never an error (unhashable: not found) */
static PyObject *
lookup(PyObject *registry, PyObject *key)
{
    if (key == NULL) {
        return NULL;
    }
    PyObject *v = PyDict_GetItemWithError(registry, key);
    if (v == NULL && PyErr_Occurred()) {
        PyErr_Clear();
    }
    return v;
}

static PyObject *
global_of(PyFrameObject *f, PyObject *name)   /* f_globals.get(name), borrowed, or NULL */
{
    PyObject *globals = PyFrame_GetGlobals(f);
    if (globals == NULL) {
        PyErr_Clear();
        return NULL;
    }
    PyObject *v = PyDict_Check(globals) ? lookup(globals, name) : NULL;
    Py_DECREF(globals);   /* globals outlive the frame's walk: the frame holds them */
    return v;
}

/* the registry's value for the frame's code (its module's __file__, co_filename, id(code)) */
static PyObject *
registered(PyObject *registry, PyFrameObject *f, int by_code, int by_file)
{
    PyObject *v = by_file ? lookup(registry, global_of(f, str_file)) : NULL;
    if (v == NULL && by_code) {
        PyCodeObject *code = PyFrame_GetCode(f);
        v = lookup(registry, code->co_filename);
        if (v == NULL) {
            PyObject *key = PyLong_FromVoidPtr(code);
            if (key == NULL) {
                PyErr_Clear();
            }
            else {
                v = lookup(registry, key);
                Py_DECREF(key);
            }
        }
        Py_DECREF(code);
    }
    return v;
}

static int by_code = 0;   /* code objects are registered by id(): walks also look at f_code */

/* 1 when the Python frame that raised the event belongs to one of the entry's trusted modules (its
 * globals' __name__ is in e->callers), is no model code (its module's __file__, its co_filename or its
 * code object registered) and is not tmtguard's own code: the handler would return at once (the code
 * guard: compile() and exec() by typing, dataclasses... which every chain may use). 0 otherwise, or
 * when unsure. */
static int
trusted_caller(entry_t *e)
{
    if (model_code == NULL || !PyDict_Check(model_code)) {
        return 0;
    }
    PyFrameObject *f = PyEval_GetFrame();   /* borrowed */
    if (f == NULL) {
        return 0;
    }
    PyObject *name = global_of(f, str_name);
    if (name == NULL || !PyUnicode_Check(name)) {
        return 0;
    }
    int in = PySet_Contains(e->callers, name);
    if (in != 1) {
        if (in < 0) {
            PyErr_Clear();
        }
        return 0;
    }
    if (registered(model_code, f, 1, 1) != NULL) {
        return 0;
    }
    if (e->own != NULL) {
        PyCodeObject *code = PyFrame_GetCode(f);
        Py_ssize_t own = PyUnicode_Tailmatch(code->co_filename, e->own, 0, PY_SSIZE_T_MAX, -1);
        Py_DECREF(code);
        if (own != 0) {
            if (own < 0) {
                PyErr_Clear();
            }
            return 0;
        }
    }
    return 1;
}

static int
model_code_on_stack(void)
{
    PyFrameObject *f = caller_frame(0);
    while (f != NULL) {
        if (registered(model_code, f, by_code, 1) != NULL) {
            Py_DECREF(f);
            return 1;
        }
        f = frame_back(f);
    }
    return 0;
}

/* getframe(depth) -> the frame sys._getframe(depth) returns, or None when the stack is not that deep.
 * Without the sys._getframe audit event: the guards ask for frames inside their own handlers and
 * wrappers (tens of times a remote-code load), and each sys._getframe call made CPython build that
 * event's arguments and call every hook. */
static PyObject *
fast_getframe(PyObject *module, PyObject *arg)
{
    UNUSED(module);
    long depth = PyLong_AsLong(arg);
    if (depth == -1 && PyErr_Occurred()) {
        return NULL;
    }
    if (depth < 0) {
        PyErr_SetString(PyExc_ValueError, "getframe(depth): depth must be >= 0");
        return NULL;
    }
    PyFrameObject *f = caller_frame(depth);
    if (f == NULL) {
        Py_RETURN_NONE;
    }
    return (PyObject *)f;
}

/* code_of(frame) -> frame.f_code, without the object.__getattr__ audit event that reading f_code
 * from Python raises on 3.11 (CPython builds its arguments, a new "f_code" str among them, for every
 * hook): the guards read the code of a few frames in every decision. */
static PyObject *
fast_code_of(PyObject *module, PyObject *arg)
{
    UNUSED(module);
    if (!PyFrame_Check(arg)) {
        PyErr_SetString(PyExc_TypeError, "code_of(frame)");
        return NULL;
    }
    return (PyObject *)PyFrame_GetCode((PyFrameObject *)arg);
}

/* set_by_code(): from now on, frames are also matched on co_filename and id(f_code) (code objects
 * rebuilt from an artifact are registered). One way: nothing turns it off. */
static PyObject *
fast_set_by_code(PyObject *module, PyObject *unused)
{
    UNUSED(module);
    UNUSED(unused);
    by_code = 1;
    Py_RETURN_NONE;
}

/* model_frame(registry, skip, by_code) -> (registry value, frame) of the innermost frame whose
 * module's __file__ (and, with by_code, whose co_filename or id(code)) is in registry, or None */
static PyObject *
fast_model_frame(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    UNUSED(module);
    if (nargs != 3 || !PyDict_Check(args[0])) {
        PyErr_SetString(PyExc_TypeError, "model_frame(dict, skip, by_code)");
        return NULL;
    }
    PyObject *registry = args[0];
    long skip = PyLong_AsLong(args[1]);
    int by_code = PyObject_IsTrue(args[2]);
    if ((skip == -1 || by_code < 0) && PyErr_Occurred()) {
        return NULL;
    }
    if (PyDict_GET_SIZE(registry) == 0) {
        Py_RETURN_NONE;
    }
    PyFrameObject *f = caller_frame(skip);
    while (f != NULL) {
        PyObject *v = registered(registry, f, by_code, 1);
        if (v != NULL) {
            PyObject *out = PyTuple_Pack(2, v, (PyObject *)f);
            Py_DECREF(f);
            return out;
        }
        f = frame_back(f);
    }
    Py_RETURN_NONE;
}

/* frames_of(codes, skip) -> [frame, ...] innermost first: the frames whose code object is a key of
 * ``codes`` (the lazy pickle wrappers) */
static PyObject *
fast_frames_of(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    UNUSED(module);
    if (nargs != 2 || !PyDict_Check(args[0])) {
        PyErr_SetString(PyExc_TypeError, "frames_of(dict, skip)");
        return NULL;
    }
    long skip = PyLong_AsLong(args[1]);
    if (skip == -1 && PyErr_Occurred()) {
        return NULL;
    }
    PyObject *out = PyList_New(0);
    if (out == NULL) {
        return NULL;
    }
    PyFrameObject *f = caller_frame(skip);
    while (f != NULL) {
        PyCodeObject *code = PyFrame_GetCode(f);
        PyObject *v = lookup(args[0], (PyObject *)code);
        Py_DECREF(code);
        if (v != NULL && PyList_Append(out, (PyObject *)f) < 0) {
            Py_DECREF(f);
            Py_DECREF(out);
            return NULL;
        }
        f = frame_back(f);
    }
    return out;
}

static int
starts_with(PyObject *str, const char *prefix)
{
    if (!PyUnicode_Check(str)) {
        return 0;
    }
    const char *s = PyUnicode_AsUTF8(str);
    if (s == NULL) {
        PyErr_Clear();
        return 0;
    }
    return strncmp(s, prefix, strlen(prefix)) == 0;
}

/* start_up(frame, stop, registry, by_code, trusted) -> provenance._library_start_up in C (see there):
 * True when, between ``frame`` and ``stop`` (or model code), a trusted framework's module body runs
 * under the import machinery and nothing else's does. trusted(name) -> bool. */
static PyObject *
fast_start_up(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    UNUSED(module);
    if (nargs != 5 || !PyDict_Check(args[2])) {
        PyErr_SetString(PyExc_TypeError, "start_up(frame, stop, registry, by_code, trusted)");
        return NULL;
    }
    PyObject *stop = args[1], *registry = args[2], *trusted = args[4];
    int by_code = PyObject_IsTrue(args[3]);
    if (by_code < 0) {
        return NULL;
    }
    if (args[0] == Py_None) {
        Py_RETURN_FALSE;
    }
    if (!PyFrame_Check(args[0])) {
        PyErr_SetString(PyExc_TypeError, "start_up: frame must be a frame");
        return NULL;
    }
    int seen = 0;
    PyObject *body = NULL;   /* the innermost module body's __name__ seen so far (new ref) */
    PyObject *result = Py_False;
    PyFrameObject *f = (PyFrameObject *)args[0];
    Py_INCREF(f);
    while (f != NULL) {
        if ((PyObject *)f == stop) {
            result = seen ? Py_True : Py_False;
            break;
        }
        PyCodeObject *code = PyFrame_GetCode(f);
        int model = lookup(registry, code->co_filename) != NULL;
        if (!model && by_code) {
            PyObject *key = PyLong_FromVoidPtr(code);
            if (key != NULL) {
                model = lookup(registry, key) != NULL;
                Py_DECREF(key);
            }
            else {
                PyErr_Clear();
            }
        }
        if (model) {
            Py_DECREF(code);
            result = seen ? Py_True : Py_False;
            break;
        }
        if (PyUnicode_CompareWithASCIIString(code->co_name, "<module>") == 0) {
            PyObject *name = global_of(f, str_name);
            if (name == NULL) {
                name = Py_None;
            }
            Py_INCREF(name);
            Py_XSETREF(body, name);
        }
        else if (PyUnicode_CompareWithASCIIString(code->co_name, "exec_module") == 0
                 && starts_with(code->co_filename, "<frozen importlib")) {
            PyFrameObject *back = PyFrame_GetBack(f);
            int machinery = 0;
            if (back != NULL) {
                PyCodeObject *bcode = PyFrame_GetCode(back);
                machinery = starts_with(bcode->co_filename, "<frozen importlib");
                Py_DECREF(bcode);
                Py_DECREF(back);
            }
            if (machinery && body != NULL && body != Py_None) {
                int ok = 0;
                if (PyUnicode_Check(body)) {
                    PyObject *r = PyObject_CallOneArg(trusted, body);
                    if (r == NULL) {
                        Py_DECREF(code);
                        Py_DECREF(f);
                        Py_DECREF(body);
                        return NULL;
                    }
                    ok = PyObject_IsTrue(r);
                    Py_DECREF(r);
                    if (ok < 0) {
                        Py_DECREF(code);
                        Py_DECREF(f);
                        Py_DECREF(body);
                        return NULL;
                    }
                }
                if (!ok) {
                    Py_DECREF(code);
                    result = Py_False;
                    break;
                }
                seen = 1;
                Py_CLEAR(body);
            }
        }
        Py_DECREF(code);
        f = frame_back(f);
    }
    Py_XDECREF(f);
    Py_XDECREF(body);
    Py_INCREF(result);
    return result;
}

/* --- gated calls ---------------------------------------------------------------------------------
 *
 * Gated(original, guarded, scope): a callable that calls ``original`` when a scoped audit handler of
 * that scope would return at once (no guarded load on the chain, no model code in the process, the
 * process-wide setting off), and ``guarded`` otherwise. The guards put one in place of a patched
 * function on a hot path (socket.socket.connect): application code then pays one C call and the
 * same test as the hook, instead of a Python frame. ``guarded`` still makes its own test first, so
 * the result does not depend on this pre-filter. As a class attribute it binds like a function
 * (Py_TPFLAGS_METHOD_DESCRIPTOR: ``sock.connect(addr)`` calls it with the socket first, with no
 * bound-method object). It has a __dict__ (``_tmtguard_original``, ``__wrapped__``, ``__doc__``). */

typedef struct {
    PyObject_HEAD
    PyObject *original;
    PyObject *guarded;
    PyObject *dict;
    int scope;
    vectorcallfunc vectorcall;
} gated_t;

static PyObject *
gated_call(PyObject *self, PyObject *const *args, size_t nargsf, PyObject *kwnames)
{
    gated_t *g = (gated_t *)self;
    PyObject *target = (n_active != 0 && in_scope(g->scope) == 0) ? g->original : g->guarded;
    return PyObject_Vectorcall(target, args, nargsf, kwnames);
}

static PyObject *
gated_new(PyTypeObject *type, PyObject *args, PyObject *kwds)
{
    PyObject *original, *guarded;
    int scope;
    if (kwds != NULL && PyDict_GET_SIZE(kwds) != 0) {
        PyErr_SetString(PyExc_TypeError, "Gated(original, guarded, scope) takes no keyword arguments");
        return NULL;
    }
    if (!PyArg_ParseTuple(args, "OOi:Gated", &original, &guarded, &scope)) {
        return NULL;
    }
    if (!PyCallable_Check(original) || !PyCallable_Check(guarded)) {
        PyErr_SetString(PyExc_TypeError, "Gated: original and guarded must be callable");
        return NULL;
    }
    if (scope < SCOPE_MODEL || scope > SCOPE_NET_WIDE) {
        PyErr_SetString(PyExc_ValueError, "Gated: unknown scope");
        return NULL;
    }
    gated_t *g = (gated_t *)type->tp_alloc(type, 0);
    if (g == NULL) {
        return NULL;
    }
    Py_INCREF(original);
    Py_INCREF(guarded);
    g->original = original;
    g->guarded = guarded;
    g->scope = scope;
    g->dict = NULL;
    g->vectorcall = gated_call;
    return (PyObject *)g;
}

static int
gated_traverse(gated_t *g, visitproc visit, void *arg)
{
    Py_VISIT(g->original);
    Py_VISIT(g->guarded);
    Py_VISIT(g->dict);
    return 0;
}

static int
gated_clear(gated_t *g)
{
    Py_CLEAR(g->original);
    Py_CLEAR(g->guarded);
    Py_CLEAR(g->dict);
    return 0;
}

static void
gated_dealloc(gated_t *g)
{
    PyObject_GC_UnTrack(g);
    gated_clear(g);
    Py_TYPE(g)->tp_free((PyObject *)g);
}

static PyObject *
gated_get(PyObject *self, PyObject *obj, PyObject *type)
{
    UNUSED(type);
    if (obj == NULL || obj == Py_None) {
        Py_INCREF(self);
        return self;
    }
    return PyMethod_New(self, obj);
}

static PyObject *
gated_repr(gated_t *g)
{
    return PyUnicode_FromFormat("<tmtguard gated %R>", g->guarded);
}

static PyMemberDef gated_members[] = {
    {"original", T_OBJECT, offsetof(gated_t, original), READONLY, "called when the guard would not act"},
    {"guarded", T_OBJECT, offsetof(gated_t, guarded), READONLY, "called otherwise (the guard's patch)"},
    {"scope", T_INT, offsetof(gated_t, scope), READONLY, "the audit scope tested first"},
    {NULL},
};

static PyTypeObject GatedType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "tmtguard._auditfast.Gated",
    .tp_basicsize = sizeof(gated_t),
    .tp_dealloc = (destructor)gated_dealloc,
    .tp_vectorcall_offset = offsetof(gated_t, vectorcall),
    .tp_repr = (reprfunc)gated_repr,
    .tp_call = PyVectorcall_Call,
    .tp_getattro = PyObject_GenericGetAttr,
    .tp_setattro = PyObject_GenericSetAttr,
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC | Py_TPFLAGS_HAVE_VECTORCALL | Py_TPFLAGS_METHOD_DESCRIPTOR,
    .tp_doc = "Gated(original, guarded, scope): original when the guard would not act, else guarded",
    .tp_traverse = (traverseproc)gated_traverse,
    .tp_clear = (inquiry)gated_clear,
    .tp_members = gated_members,
    .tp_descr_get = gated_get,
    .tp_dictoffset = offsetof(gated_t, dict),
    .tp_new = gated_new,
};

static PyMethodDef methods[] = {
    {"install", (PyCFunction)(void (*)(void))fast_install, METH_FASTCALL,
     "install(dispatcher, gate): add the C audit hook (once; it cannot be removed), set the dispatcher and the gate."},
    {"register", (PyCFunction)(void (*)(void))fast_register, METH_FASTCALL,
     "register(event, handler, allowed): route event to dispatcher(event, args, handler) unless args is in allowed."},
    {"unregister", (PyCFunction)fast_unregister, METH_O, "unregister(event)"},
    {"lookup", (PyCFunction)fast_lookup, METH_O, "lookup(event) -> (allowed, handler) or None"},
    {"identical", (PyCFunction)(void (*)(void))fast_identical, METH_FASTCALL,
     "identical(entries, pairs) -> -1, or the index of the first (owner, attr, value) or (obj, cls) that differs"},
    {"realpath", (PyCFunction)fast_realpath, METH_O,
     "realpath(path) -> realpath(3) of an existing path, or None"},
    {"set_reads", (PyCFunction)(void (*)(void))fast_set_reads, METH_FASTCALL,
     "set_reads(env, sources, memo) or set_reads(None): the file guard's read fast path on or off"},
    {"set_scope", (PyCFunction)(void (*)(void))fast_set_scope, METH_FASTCALL,
     "set_scope(chain_contextvar, model_code_dict): what scoped handlers are filtered on"},
    {"set_wide", (PyCFunction)(void (*)(void))fast_set_wide, METH_FASTCALL,
     "set_wide(kind, on): a process-wide setting (2: TMTGUARD_PROCESS_WIDE, 3: network.process_wide)"},
    {"wide", (PyCFunction)fast_wide, METH_NOARGS, "wide() -> (process_wide, network_process_wide)"},
    {"generation", (PyCFunction)fast_generation, METH_NOARGS,
     "generation() -> a number every register/unregister changes (the tamper guard's quick check)"},
    {"set_by_code", (PyCFunction)fast_set_by_code, METH_NOARGS,
     "set_by_code(): the scope test also matches frames on co_filename and id(f_code) from now on"},
    {"stat_key", (PyCFunction)fast_stat_key, METH_O,
     "stat_key(path or fd) -> (st_dev, st_ino, st_size, st_mtime_ns) of stat(2) / fstat(2)"},
    {"code_of", (PyCFunction)fast_code_of, METH_O,
     "code_of(frame) -> frame.f_code (no audit event)"},
    {"read_file", (PyCFunction)(void (*)(void))fast_read_file, METH_FASTCALL,
     "read_file(path, limit) -> (stat_key, bytes) of a regular file under limit bytes, or None (no audit event)"},
    {"getframe", (PyCFunction)fast_getframe, METH_O,
     "getframe(depth) -> sys._getframe(depth), or None when the stack is not that deep (no audit event)"},
    {"model_frame", (PyCFunction)(void (*)(void))fast_model_frame, METH_FASTCALL,
     "model_frame(registry, skip, by_code) -> (registry value, frame) of the innermost registered frame, or None"},
    {"frames_of", (PyCFunction)(void (*)(void))fast_frames_of, METH_FASTCALL,
     "frames_of(codes, skip) -> the frames running one of these code objects, innermost first"},
    {"start_up", (PyCFunction)(void (*)(void))fast_start_up, METH_FASTCALL,
     "start_up(frame, stop, registry, by_code, trusted) -> provenance._library_start_up in C"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef moduledef = {
    PyModuleDef_HEAD_INIT, "tmtguard._auditfast",
    "tmtguard's audit hook fast path in C.", -1, methods, NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC
PyInit__auditfast(void)
{
    if (PyType_Ready(&GatedType) < 0) {
        return NULL;
    }
    str_file = PyUnicode_InternFromString("__file__");
    str_name = PyUnicode_InternFromString("__name__");
    if (str_file == NULL || str_name == NULL) {
        return NULL;
    }
    PyObject *m = PyModule_Create(&moduledef);
    if (m == NULL) {
        return NULL;
    }
    Py_INCREF(&GatedType);
    if (PyModule_AddObject(m, "Gated", (PyObject *)&GatedType) < 0) {
        Py_DECREF(&GatedType);
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
