"""Where generate.py and fid.py write: output folders and files checked before any work, with one-line errors.

generate.py writes only into a new or empty --outdir (never beside an earlier run's outputs, which fid.py calc
would then score with the new ones); files (--npz, fid.py's --dest and --out) are replaced atomically.
"""

import os

import dnnlib
from sampling import GenerationError

#----------------------------------------------------------------------------

def _check_creatable(path, option):
    """The folders up to `path` can be made and written (dnnlib.util.output_dir_problem, shared with train.py)."""
    problem = dnnlib.util.output_dir_problem(path)
    if problem is not None:
        raise GenerationError(f'{option}="{path}": {problem}; choose another path')


def check_output_dir(path, option='--outdir', empty=True):
    """Refuse an output folder that is a file, cannot be made or written, or (with `empty`) already holds files."""
    path = os.fspath(path)
    if os.path.exists(path) and not os.path.isdir(path):
        raise GenerationError(f'{option}="{path}" is a file; pass a folder')
    _check_creatable(path, option)
    if empty and os.path.isdir(path):
        names = sorted(os.listdir(path))
        if names:
            raise GenerationError(f'{option}="{path}" already holds {len(names)} file(s) or folder(s) (e.g. {names[0]}); '
                                  'generate.py writes only into a new or empty folder, so that fid.py never scores an '
                                  'earlier run\'s outputs with the new ones: choose another folder or empty this one')


def check_output_file(path, option):
    """Refuse an output file whose path is a folder or lies under a file or an unwritable folder."""
    path = os.fspath(path)
    if os.path.isdir(path):
        raise GenerationError(f'{option}="{path}" is a folder; pass a file name (e.g. {os.path.join(path, "out.npz")})')
    _check_creatable(os.path.dirname(os.path.abspath(path)), option)


def make_output_dir(path, option='--outdir'):
    """os.makedirs, with a one-line error (GenerationError) instead of a traceback."""
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as err:
        raise GenerationError(f'{option}="{path}": cannot create it ({err.strerror}); choose another path') from None
