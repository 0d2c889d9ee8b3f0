"""Pickles that carry the source code of their classes.

Decorate a class with `@persistent_class`. Pickling an instance then stores, instead of a reference
to `module.ClassName`, a call

    torch_utils.persistence._reconstruct_persistent_obj(meta)
    meta = dict(type='class', version=6, module_src=<full source text of the defining module>,
                class_name=<name of the class in that module>, state=<the instance's __dict__>)

so the pickle loads in a fresh process from any directory, even after the defining file has been
changed or deleted: only `torch_utils` must be importable. On load, the embedded source is compiled
into a private module (one per distinct source text, cached) and the instance is rebuilt from
`state` without calling `__init__`. When the embedded source equals the source of a module already
imported under its own name, that live module is used, so a fresh snapshot of current code gives
instances of the current classes. This meta layout is the one NVlabs/edm snapshots use, so their
pickles load as well. When the embedded source no longer imports (a module it imports was moved or
removed by later code), the current persistent class of the same name is used instead, provided it has
been imported (sampling.snapshots imports every class that our snapshots hold).

Everything else an instance refers to must itself be picklable by reference from torch, numpy or
the standard library, or be another persistent class. Loading a pickle executes code: load only
files you trust (see `generate.py --export-safe` for a code-free alternative).

The arguments passed to `__init__` are recorded in `init_args` / `init_kwargs`, which lets a
network be rebuilt from a JSON description of its architecture.
"""

import copy
import hashlib
import inspect
import sys
import types

_FORMAT_VERSION = 6
_module_by_src_hash = dict()  # sha256(source) -> module holding that source
_src_by_module_name = dict()  # name of a module built from embedded source -> its source text
_persistent_classes = set()

#----------------------------------------------------------------------------

def _src_hash(src):
    return hashlib.sha256(src.encode('utf-8')).hexdigest()


def _module_source(module):
    """The full source text of `module`, also for modules built from embedded source."""
    if module.__name__ in _src_by_module_name:
        return _src_by_module_name[module.__name__]
    return inspect.getsource(module)


def persistent_class(orig_class):
    """Class decorator: instances pickle together with the source of the defining module."""
    assert isinstance(orig_class, type), 'persistent_class decorates classes only'
    if is_persistent(orig_class):
        return orig_class
    module = sys.modules[orig_class.__module__]
    module_src = _module_source(module)
    # A live module whose source is known is reused when a pickle carries the same source.
    _module_by_src_hash.setdefault(_src_hash(module_src), module)

    class Persistent(orig_class):
        _orig_module_src = module_src
        _orig_class_name = orig_class.__name__

        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self._init_args = copy.deepcopy(args)
            self._init_kwargs = copy.deepcopy(kwargs)

        @property
        def init_args(self):
            return copy.deepcopy(self._init_args)

        @property
        def init_kwargs(self):
            return copy.deepcopy(self._init_kwargs)

        def __reduce__(self):
            meta = dict(type='class', version=_FORMAT_VERSION, module_src=self._orig_module_src,
                        class_name=self._orig_class_name, state=self.__getstate__())
            return (_reconstruct_persistent_obj, (meta,))

    Persistent.__name__ = orig_class.__name__
    Persistent.__qualname__ = orig_class.__qualname__
    Persistent.__module__ = orig_class.__module__
    Persistent.__doc__ = orig_class.__doc__
    _persistent_classes.add(Persistent)
    return Persistent


def is_persistent(obj):
    """True if `obj` is a persistent class or an instance of one."""
    cls = obj if isinstance(obj, type) else type(obj)
    return cls in _persistent_classes

#----------------------------------------------------------------------------

def _module_from_src(src):
    """Return a module holding `src`: a live module with the same source, or a private copy."""
    key = _src_hash(src)
    module = _module_by_src_hash.get(key)
    if module is not None:
        return module
    name = f'_persistent_module_{key[:16]}'
    module = types.ModuleType(name)
    # Registered before executing, so the decorator inside the source can find its own text.
    sys.modules[name] = module
    _src_by_module_name[name] = src
    _module_by_src_hash[key] = module
    try:
        exec(compile(src, f'<persistent source {name}>', 'exec'), module.__dict__) # pylint: disable=exec-used
    except BaseException:
        del sys.modules[name], _src_by_module_name[name], _module_by_src_hash[key]
        raise
    return module


def _live_class(class_name):
    """The one persistent class of the current code named `class_name` (among those imported), or None."""
    found = [c for c in _persistent_classes if c._orig_class_name == class_name and
             c.__module__ not in _src_by_module_name] # Not a class built from embedded source.
    return found[0] if len(found) == 1 else None


def _reconstruct_persistent_obj(meta):
    """Rebuild an instance pickled by a persistent class (see the module docstring for `meta`)."""
    meta = dict(meta)
    if meta.get('type') != 'class':
        raise ValueError(f'Unsupported persistent object type {meta.get("type")!r}')
    if meta.get('version', 0) > _FORMAT_VERSION:
        raise ValueError(f'Persistent object format version {meta["version"]} is newer than this code '
                         f'understands ({_FORMAT_VERSION}); update torch_utils')
    try:
        module = _module_from_src(meta['module_src'])
    except ImportError as err:
        # The embedded source imports a module that was moved or removed since the pickle was written
        # (e.g. training/eot.py before the losses moved to models/eot_loss.py): use the current class of
        # that name, which the caller must have imported, and give it the pickled state.
        cls = _live_class(meta['class_name'])
        if cls is None:
            raise ImportError(f'The pickled class {meta["class_name"]!r} comes with source that no longer imports '
                              f'({err}), and no current persistent class has that name') from err
    else:
        cls = getattr(module, meta['class_name'], None)
    if cls is None:
        raise ValueError(f'Embedded source defines no class named {meta["class_name"]!r}')
    obj = cls.__new__(cls)
    state = meta.get('state')
    if state is not None:
        if hasattr(obj, '__setstate__'):
            obj.__setstate__(state)
        else:
            obj.__dict__.update(state)
    return obj
