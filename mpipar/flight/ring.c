/* The flight recorder's ring in C (mpipar.flight.recorder; built by mpipar.flight.ring).

   Every communication call records its start and end. The pure-Python recorder
   builds a tuple and two floats per call and runs two frames; here a call is two
   C calls that store into a fixed array of slots: nothing is allocated (the
   references a slot holds are the caller's own objects: its name string, its
   channel, dtype, shape and algorithm), and the sequence numbers are counted in
   the channel's `flight_counts` (a memoryview of two int64: collectives, p2p).
   Records are turned into Python values only when read (entry, end, noted), at
   dump time. Times are time.perf_counter()'s clock (CLOCK_MONOTONIC on Linux).
   The GIL makes each call atomic for the watchdog thread: a slot is filled before
   `current` names it, and a replaced reference is released only after that.
*/
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <time.h>

typedef struct {
    PyObject *name, *ch, *dt, *sh, *algo, *info; /* owned references (NULL: empty) */
    long long seq;
    long peer;
    double start, end;
} Slot;

static Slot *ring = NULL;
static Py_ssize_t capacity = 0, mask = 0;
static Py_ssize_t current = ~(Py_ssize_t)0; /* >= 0: slot in flight; < 0: ~(next slot) */
static Py_ssize_t laps = 0;                 /* times the ring wrapped */
static PyObject *described = NULL;          /* recorder.described: .info, the call's description */
static PyObject *s_counts, *s_info;

static double now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)((long long)ts.tv_sec * 1000000000LL + ts.tv_nsec) / 1e9; /* as perf_counter */
}

static int ready(void)
{
    if (ring == NULL) {
        PyErr_SetString(PyExc_RuntimeError, "mpipar flight ring: init() was not called");
        return 0;
    }
    return 1;
}

/* The channel's counter k (0: collectives, 1: point-to-point) incremented; -1 on error. */
static long long count(PyObject *ch, int k)
{
    PyObject *counts = PyObject_GetAttr(ch, s_counts);
    if (counts == NULL)
        return -1;
    if (!PyMemoryView_Check(counts) || PyMemoryView_GET_BUFFER(counts)->len < 16 ||
        PyMemoryView_GET_BUFFER(counts)->readonly) {
        Py_DECREF(counts);
        PyErr_SetString(PyExc_TypeError, "flight_counts must be recorder.counts() (two writable int64)");
        return -1;
    }
    long long *c = (long long *)PyMemoryView_GET_BUFFER(counts)->buf;
    long long s = ++c[k];
    Py_DECREF(counts); /* the channel keeps it */
    return s;
}

/* Record the start of a call: its slot (0..capacity-1), -1 when nested (the outer call stands
   for it), -2 with an exception set. `info`: its description (NULL: none yet; `done` files
   the one left in described.info). */
static Py_ssize_t record(PyObject *ch, PyObject *name, PyObject *dt, PyObject *sh, PyObject *algo, long peer,
                         PyObject *info)
{
    if (current >= 0)
        return -1;
    if (!ready())
        return -2;
    long long seq = count(ch, peer == -1 ? 0 : 1);
    if (seq < 0)
        return -2;
    Py_ssize_t i = ~current;
    Slot *s = &ring[i];
    PyObject *old[6] = {s->name, s->ch, s->dt, s->sh, s->algo, s->info};
    Py_INCREF(name); Py_INCREF(ch); Py_INCREF(dt); Py_INCREF(sh); Py_INCREF(algo); Py_XINCREF(info);
    s->name = name; s->ch = ch; s->dt = dt; s->sh = sh; s->algo = algo; s->info = info;
    s->seq = seq;
    s->peer = peer;
    s->end = 0.0;
    s->start = now();
    if (!i)
        laps++;
    current = i; /* last: the watchdog reads the slot it names */
    for (int k = 0; k < 6; k++)
        Py_XDECREF(old[k]);
    return i;
}

/* record()'s result for Python: the slot as an int (small ints: cached), or NULL on error. */
static PyObject *slot_value(Py_ssize_t i)
{
    return i == -2 ? NULL : PyLong_FromSsize_t(i);
}

static int peer_of(PyObject *obj, long *peer)
{
    *peer = PyLong_AsLong(obj);
    return !(*peer == -1 && PyErr_Occurred());
}

static PyObject *begin(PyObject *self, PyObject *const *args, Py_ssize_t n)
{
    long peer = -1;
    if (n < 2 || n > 6) {
        PyErr_SetString(PyExc_TypeError, "begin(ch, name, dt=None, sh=None, algo=None, peer=-1): positional");
        return NULL;
    }
    if (n > 5 && !peer_of(args[5], &peer))
        return NULL;
    return slot_value(record(args[0], args[1], n > 2 ? args[2] : Py_None, n > 3 ? args[3] : Py_None,
                             n > 4 ? args[4] : Py_None, peer, NULL));
}

static PyObject *begin_p2p(PyObject *self, PyObject *const *args, Py_ssize_t n)
{
    long peer;
    if (n < 3 || n > 6) {
        PyErr_SetString(PyExc_TypeError, "begin_p2p(ch, name, to, dt=None, sh=None, detail=None): positional");
        return NULL;
    }
    if (!peer_of(args[2], &peer))
        return NULL;
    return slot_value(record(args[0], args[1], n > 3 ? args[3] : Py_None, n > 4 ? args[4] : Py_None,
                             n > 5 ? args[5] : Py_None, peer, NULL));
}

/* 0 when slot i can be read or ended (the ring is ready, 0 <= i < capacity); else -1 with an
   exception set. */
static int check_slot(Py_ssize_t i, const char *what)
{
    if (!ready())
        return -1;
    if (i < 0 || i >= capacity) {
        PyErr_Format(PyExc_IndexError, "%s: slot %zd", what, i);
        return -1;
    }
    return 0;
}

/* The call in slot i ends now; the next call takes the slot after it. */
static void finish(Py_ssize_t i)
{
    ring[i].end = now();
    current = ~((i + 1) & mask);
}

static PyObject *done(PyObject *self, PyObject *arg)
{
    Py_ssize_t i = PyLong_AsSsize_t(arg);
    if (i == -1 && PyErr_Occurred())
        return NULL;
    if (i < 0)
        Py_RETURN_NONE;
    if (check_slot(i, "done") < 0)
        return NULL;
    PyObject *info = PyObject_GetAttr(described, s_info); /* new reference, kept by the slot */
    if (info == NULL || PyObject_SetAttr(described, s_info, Py_None) < 0) {
        Py_XDECREF(info);
        return NULL;
    }
    PyObject *old = ring[i].info;
    ring[i].info = info;
    finish(i);
    Py_XDECREF(old);
    Py_RETURN_NONE;
}

/* Slot number `arg` of a reader (entry, end, noted); -1 with an exception set when it is not one. */
static Py_ssize_t slot_of(PyObject *arg, const char *what)
{
    Py_ssize_t i = PyLong_AsSsize_t(arg);
    if (i == -1 && PyErr_Occurred())
        return -1;
    return check_slot(i, what) < 0 ? -1 : i;
}

static PyObject *entry(PyObject *self, PyObject *arg)
{
    /* slot i as recorder.py's tuple (name, ch, seq, dt, sh, algo, peer, start), or None */
    Py_ssize_t i = slot_of(arg, "entry");
    if (i < 0)
        return NULL;
    Slot *s = &ring[i];
    if (s->name == NULL)
        Py_RETURN_NONE;
    return Py_BuildValue("(OOLOOOld)", s->name, s->ch, s->seq, s->dt, s->sh, s->algo, s->peer, s->start);
}

static PyObject *end(PyObject *self, PyObject *arg)
{
    Py_ssize_t i = slot_of(arg, "end");
    if (i < 0)
        return NULL;
    return PyFloat_FromDouble(ring[i].end);
}

static PyObject *noted(PyObject *self, PyObject *arg)
{
    Py_ssize_t i = slot_of(arg, "noted");
    if (i < 0)
        return NULL;
    PyObject *info = ring[i].info ? ring[i].info : Py_None;
    Py_INCREF(info);
    return info;
}

static void clear(void)
{
    for (Py_ssize_t i = 0; i < capacity; i++) {
        Slot *s = &ring[i];
        PyObject *old[6] = {s->name, s->ch, s->dt, s->sh, s->algo, s->info};
        memset(s, 0, sizeof(*s));
        for (int k = 0; k < 6; k++)
            Py_XDECREF(old[k]);
    }
}

static PyObject *init(PyObject *self, PyObject *args)
{
    Py_ssize_t cap;
    PyObject *d;
    if (!PyArg_ParseTuple(args, "nO", &cap, &d))
        return NULL;
    if (cap < 1 || (cap & (cap - 1))) {
        PyErr_SetString(PyExc_ValueError, "init: the capacity must be a power of two");
        return NULL;
    }
    if (ring != NULL) {
        clear();
        PyMem_Free(ring);
    }
    ring = PyMem_Calloc((size_t)cap, sizeof(Slot));
    if (ring == NULL)
        return PyErr_NoMemory();
    capacity = cap;
    mask = cap - 1;
    current = ~(Py_ssize_t)0;
    laps = 0;
    Py_INCREF(d);
    Py_XSETREF(described, d);
    Py_RETURN_NONE;
}

static PyObject *reset(PyObject *self, PyObject *unused)
{
    if (!ready())
        return NULL;
    current = ~(Py_ssize_t)0;
    laps = 0;
    clear();
    Py_RETURN_NONE;
}

static PyObject *state(PyObject *self, PyObject *unused)
{
    return Py_BuildValue("(nn)", current, laps);
}

/* For other extensions (mpipar.comm.agreement.fast): record a collective without Python
   frames. begin_c records collective `name` on `ch` described by `info` (dtype and shape,
   kept by the slot from the start, so a record written while it waits has them) and
   returns the slot (-1: nested, -2: error set); end_c ends slot i: 0 (-1: error set). */
static Py_ssize_t begin_c(PyObject *ch, PyObject *name, PyObject *algo, PyObject *info)
{
    return record(ch, name, Py_None, Py_None, algo, -1, info);
}

static int end_c(Py_ssize_t i)
{
    if (i < 0)
        return 0;
    if (check_slot(i, "end") < 0)
        return -1;
    finish(i);
    return 0;
}

typedef struct {
    Py_ssize_t (*begin)(PyObject *ch, PyObject *name, PyObject *algo, PyObject *info);
    int (*end)(Py_ssize_t i);
} RingApi;

static RingApi api = {begin_c, end_c};

static PyMethodDef methods[] = {
    {"begin", (PyCFunction)(void (*)(void))begin, METH_FASTCALL, "recorder.begin (positional arguments)"},
    {"begin_p2p", (PyCFunction)(void (*)(void))begin_p2p, METH_FASTCALL, "recorder.begin_p2p (positional)"},
    {"done", done, METH_O, "recorder.done"},
    {"entry", entry, METH_O, "slot i as (name, ch, seq, dt, sh, algo, peer, start), or None"},
    {"end", end, METH_O, "the end time of the call in slot i (0.0 while it is in flight)"},
    {"noted", noted, METH_O, "the description the call in slot i took when it ended, or None"},
    {"init", init, METH_VARARGS, "init(capacity, described)"},
    {"reset", reset, METH_NOARGS, "forget every call"},
    {"state", state, METH_NOARGS, "(current, laps)"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "mpipar_flight_ring", NULL, -1, methods,
                                    NULL, NULL, NULL, NULL};

PyMODINIT_FUNC PyInit_mpipar_flight_ring(void)
{
    s_counts = PyUnicode_InternFromString("flight_counts");
    s_info = PyUnicode_InternFromString("info");
    if (!s_counts || !s_info)
        return NULL;
    PyObject *m = PyModule_Create(&module);
    if (m == NULL)
        return NULL;
    PyObject *cap = PyCapsule_New(&api, "mpipar_flight_ring.api", NULL);
    if (cap == NULL || PyModule_AddObject(m, "api", cap) < 0) {
        Py_XDECREF(cap);
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
